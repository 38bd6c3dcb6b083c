//! The frequency-tagged stimulus (METHOD.md section 1): region masks, the contrast scalar of each
//! region in each frame, exact frame de-duplication, seeded stimulus noise, and frame tensors.
//!
//! In: a preprocessed image (`[3, H, W]`, RGB in [0,1]) and the model's mean/std.
//! Out: batches of frames `[B, 3, H, W]` as the network sees them.

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::config::{OffBin, StimulusConfig};

/// What the contrast scalar multiplies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Modulate {
    /// The image after mean/std normalisation (the authors' later code).
    Normalized,
    /// RGB values in [0,1] before normalisation (a change toward black).
    Pixel,
}

/// A region index per pixel of the model input (`None` = untagged, contrast 1).
#[derive(Debug, Clone, Serialize)]
pub struct Regions {
    /// Side of the (square) model input.
    pub size: usize,
    /// Row-major region index per pixel.
    #[serde(skip)]
    pub index: Vec<Option<u16>>,
    /// Number of regions.
    pub n: usize,
    /// How they were made, for the record.
    pub layout: String,
}

impl Regions {
    /// A `rows x cols` grid over a `size x size` input; region `r*cols + c`.
    /// Halves are the 1x2 grid (left = region 0, columns `< W/2`), quadrants 2x2.
    pub fn grid(size: usize, rows: usize, cols: usize, layout: &str) -> Self {
        let mut index = Vec::with_capacity(size * size);
        for y in 0..size {
            for x in 0..size {
                let r = y * rows / size;
                let c = x * cols / size;
                index.push(Some((r * cols + c) as u16));
            }
        }
        Regions {
            size,
            index,
            n: rows * cols,
            layout: layout.to_string(),
        }
    }

    /// Regions from a label image: each distinct grey value (ascending) is a region, except
    /// `untagged`. The mask is resized to the input with nearest-neighbour sampling.
    pub fn from_mask(path: &Path, size: usize, untagged: Option<u8>) -> Result<Self, String> {
        let img = image::open(path)
            .map_err(|e| format!("stimulus.mask: cannot read {}: {e}", path.display()))?
            .to_luma8();
        let (w, h) = img.dimensions();
        let mut values: Vec<u8> = img.pixels().map(|p| p.0[0]).collect();
        values.sort_unstable();
        values.dedup();
        values.retain(|v| Some(*v) != untagged);
        let lookup: HashMap<u8, u16> = values
            .iter()
            .enumerate()
            .map(|(i, v)| (*v, i as u16))
            .collect();
        let mut index = Vec::with_capacity(size * size);
        for y in 0..size {
            for x in 0..size {
                let sx = (x as u64 * w as u64 / size as u64) as u32;
                let sy = (y as u64 * h as u64 / size as u64) as u32;
                index.push(lookup.get(&img.get_pixel(sx, sy).0[0]).copied());
            }
        }
        Ok(Regions {
            size,
            index,
            n: values.len(),
            layout: format!("mask {}", path.display()),
        })
    }

    /// Builds the regions a `[stimulus]` section asks for.
    pub fn from_config(
        st: &StimulusConfig,
        mask: Option<&Path>,
        size: usize,
    ) -> Result<Self, String> {
        match st.regions.as_str() {
            "halves" => Ok(Regions::grid(size, 1, 2, "halves")),
            "quadrants" => Ok(Regions::grid(size, 2, 2, "quadrants")),
            "grid" => match st.grid {
                Some([r, c]) if r >= 1 && c >= 1 && r <= size && c <= size => {
                    Ok(Regions::grid(size, r, c, &format!("grid {r}x{c}")))
                }
                _ => Err("stimulus.grid: regions = \"grid\" needs grid = [rows, cols], each between 1 and the input size".into()),
            },
            "mask" => match mask {
                Some(p) => Regions::from_mask(p, size, st.mask_untagged),
                None => Err("stimulus.mask: regions = \"mask\" needs mask = \"label-image.png\"".into()),
            },
            other => Err(format!(
                "stimulus.regions: unknown layout `{other}`; use halves, quadrants, grid or mask"
            )),
        }
    }

    /// Number of regions.
    pub fn count(&self) -> usize {
        self.n
    }
}

/// The resolved stimulus.
#[derive(Debug, Clone, Serialize)]
pub struct StimulusSpec {
    /// Regions over the input.
    pub regions: Regions,
    /// Frequency per region, Hz.
    pub frequencies: Vec<f64>,
    /// Phase per region, radians.
    pub phases: Vec<f64>,
    /// Frames per second.
    pub fps: f64,
    /// Number of frames.
    pub frames: usize,
    /// Contrast range.
    pub smin: f64,
    /// Contrast range.
    pub smax: f64,
    /// What the scalar multiplies.
    pub modulate: Modulate,
    /// Gaussian pixel noise standard deviation (0 = off).
    pub noise_std: f64,
    /// Noise seed.
    pub noise_seed: u64,
    /// Whether identical frames are run once.
    pub dedup: bool,
}

impl StimulusSpec {
    /// Checks a `[stimulus]` section against METHOD.md's rules, collecting every problem.
    pub fn new(
        st: &StimulusConfig,
        regions: Regions,
        warnings: &mut Vec<String>,
    ) -> Result<Self, Vec<String>> {
        let mut problems = Vec::new();
        let n = st.frequencies.len();
        if n == 0 {
            problems.push("stimulus.frequencies: give at least one frequency".into());
        }
        if regions.count() != n {
            problems.push(format!(
                "stimulus.frequencies: {} frequencies for {} regions ({}); give one per region",
                n,
                regions.count(),
                regions.layout
            ));
        }
        let phases = st.phases.clone().unwrap_or_else(|| vec![0.0; n]);
        if phases.len() != n {
            problems.push(format!(
                "stimulus.phases: {} phases for {} frequencies; give one per frequency",
                phases.len(),
                n
            ));
        }
        if !(st.fps > 0.0 && st.fps.is_finite()) {
            problems.push("stimulus.fps must be a positive number".into());
        }
        if st.frames < 8 {
            problems.push(format!(
                "stimulus.frames = {}: use at least 8 frames",
                st.frames
            ));
        }
        if !(0.0..=st.smax).contains(&st.smin) || !st.smax.is_finite() {
            problems.push(format!(
                "stimulus.smin/smax = {}/{}: need 0 <= smin <= smax",
                st.smin, st.smax
            ));
        }
        if st.noise_std < 0.0 || !st.noise_std.is_finite() {
            problems.push("stimulus.noise_std must be 0 (off) or positive".into());
        }
        let nyquist = st.fps / 2.0;
        for (i, f) in st.frequencies.iter().enumerate() {
            let key = format!("stimulus.frequencies[{i}] = {f} Hz");
            if !(*f > 0.0 && f.is_finite()) {
                problems.push(format!("{key}: frequencies must be positive"));
                continue;
            }
            if *f >= nyquist {
                problems.push(format!(
                    "{key} is at or above Nyquist ({nyquist} Hz at {} fps): lower it or raise stimulus.fps",
                    st.fps
                ));
                continue;
            }
            let bin = f * st.frames as f64 / st.fps;
            if (bin - bin.round()).abs() > 1e-9 {
                let msg = format!(
                    "{key} falls between bins (bin {bin:.3} at {} Hz resolution) and leaks into its neighbours: choose frames so that f*frames/fps is an integer",
                    st.fps / st.frames as f64
                );
                match st.off_bin {
                    OffBin::Warn => warnings.push(msg),
                    OffBin::Error => problems.push(format!("{msg} (stimulus.off_bin = \"error\")")),
                }
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(StimulusSpec {
            regions,
            frequencies: st.frequencies.clone(),
            phases,
            fps: st.fps,
            frames: st.frames,
            smin: st.smin,
            smax: st.smax,
            modulate: st.modulate,
            noise_std: st.noise_std,
            noise_seed: st.noise_seed,
            dedup: st.dedup_frames,
        })
    }

    /// `s_r(i)` as the network sees it: computed in f64, cast to f32.
    pub fn scalar(&self, region: usize, frame: usize) -> f32 {
        let f = self.frequencies[region];
        let phi = self.phases[region];
        let t = 2.0 * std::f64::consts::PI * f * frame as f64 / self.fps + phi;
        (self.smin + (self.smax - self.smin) / 2.0 * (1.0 + t.sin())) as f32
    }

    /// The scalar tuple of every frame: `[frame][region]`.
    pub fn scalars(&self) -> Vec<Vec<f32>> {
        (0..self.frames)
            .map(|i| {
                (0..self.regions.count())
                    .map(|r| self.scalar(r, i))
                    .collect()
            })
            .collect()
    }

    /// Distinct scalar tuples (compared as f32 bits) and, for each frame, the index of its tuple.
    /// Without dedup (or with noise, which makes every frame unique) each frame is its own.
    pub fn distinct_frames(&self) -> (Vec<Vec<f32>>, Vec<usize>) {
        let all = self.scalars();
        if !self.dedup || self.noise_std > 0.0 {
            let idx = (0..all.len()).collect();
            return (all, idx);
        }
        let mut seen: HashMap<Vec<u32>, usize> = HashMap::new();
        let mut distinct = Vec::new();
        let mut map = Vec::with_capacity(all.len());
        for tuple in all {
            let key: Vec<u32> = tuple.iter().map(|v| v.to_bits()).collect();
            let next = distinct.len();
            let i = *seen.entry(key).or_insert(next);
            if i == next {
                distinct.push(tuple);
            }
            map.push(i);
        }
        (distinct, map)
    }

    /// The per-pixel scalar map `[H*W]` for one tuple of region scalars.
    fn scalar_map(&self, tuple: &[f32]) -> Vec<f32> {
        self.regions
            .index
            .iter()
            .map(|r| r.map_or(1.0, |r| tuple[r as usize]))
            .collect()
    }

    /// Writes one frame `[3, H, W]` into `out`: the image `rgb` (RGB in [0,1], `[3, H, W]`)
    /// modulated by `tuple`, normalised with `mean`/`std`, plus this frame's noise if any.
    #[allow(clippy::too_many_arguments)]
    pub fn write_frame(
        &self,
        rgb: &[f32],
        mean: [f32; 3],
        std: [f32; 3],
        tuple: &[f32],
        noise: Option<&mut NoiseStream>,
        out: &mut [f32],
    ) {
        let hw = self.regions.size * self.regions.size;
        let s = self.scalar_map(tuple);
        let mut noise = noise;
        for c in 0..3 {
            let (m, sd) = (mean[c], std[c]);
            let src = &rgb[c * hw..(c + 1) * hw];
            let dst = &mut out[c * hw..(c + 1) * hw];
            for i in 0..hw {
                let n = noise.as_mut().map_or(0.0, |n| n.next_gaussian() as f32);
                dst[i] = match self.modulate {
                    Modulate::Normalized => (src[i] - m) / sd * s[i] + n / sd,
                    Modulate::Pixel => (src[i] * s[i] + n - m) / sd,
                };
            }
        }
    }
}

/// A seeded Gaussian stream for one image: SplitMix64 seeded by (seed, image id) and Box-Muller.
/// The seed never depends on the worker, so results do not depend on how images were split.
pub struct NoiseStream {
    state: u64,
    std: f64,
    spare: Option<f64>,
}

impl NoiseStream {
    /// The stream of image `image_id` under `seed`.
    pub fn new(seed: u64, image_id: &str, std: f64) -> Self {
        // FNV-1a of the id, mixed with the seed.
        let mut h: u64 = 0xcbf29ce484222325;
        for b in image_id.as_bytes() {
            h ^= *b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
        NoiseStream {
            state: h ^ seed.wrapping_mul(0x9e3779b97f4a7c15),
            std,
            spare: None,
        }
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e3779b97f4a7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
        z ^ (z >> 31)
    }

    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// The next Gaussian sample with the stream's standard deviation.
    pub fn next_gaussian(&mut self) -> f64 {
        if let Some(s) = self.spare.take() {
            return s;
        }
        let (u1, u2) = (self.uniform(), self.uniform());
        let r = (-2.0 * u1.ln()).sqrt() * self.std;
        let t = 2.0 * std::f64::consts::PI * u2;
        self.spare = Some(r * t.sin());
        r * t.cos()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(toml_text: &str) -> StimulusSpec {
        let st: StimulusConfig = toml::from_str(toml_text).unwrap();
        let regions = Regions::from_config(&st, None, 32).unwrap();
        StimulusSpec::new(&st, regions, &mut Vec::new()).unwrap()
    }

    #[test]
    fn scalar_matches_the_formula() {
        let s = spec("");
        for i in 0..240 {
            for (r, f) in [6.0f64, 7.5].iter().enumerate() {
                let want =
                    0.5 + 0.25 * (1.0 + (2.0 * std::f64::consts::PI * f * i as f64 / 120.0).sin());
                assert!((s.scalar(r, i) as f64 - want).abs() < 1e-7);
            }
        }
        assert_eq!(s.scalar(0, 0), 0.75);
        // a quarter period of 6 Hz at 120 fps is 5 frames: the peak smax.
        assert_eq!(s.scalar(0, 5), 1.0);
    }

    #[test]
    fn paper_settings_have_49_distinct_frames() {
        let s = spec("");
        let (distinct, map) = s.distinct_frames();
        assert_eq!(distinct.len(), 49);
        assert_eq!(map.len(), 240);
        let all = s.scalars();
        for (i, d) in map.iter().enumerate() {
            assert_eq!(all[i], distinct[*d]);
        }
    }

    #[test]
    fn halves_split_at_w_over_2() {
        let r = Regions::grid(32, 1, 2, "halves");
        assert_eq!(r.index[15], Some(0));
        assert_eq!(r.index[16], Some(1));
        assert_eq!(r.index[31 * 32 + 31], Some(1));
        let q = Regions::grid(32, 2, 2, "quadrants");
        assert_eq!(q.index[0], Some(0));
        assert_eq!(q.index[31], Some(1));
        assert_eq!(q.index[16 * 32], Some(2));
        assert_eq!(q.index[32 * 32 - 1], Some(3));
    }

    #[test]
    fn mask_values_become_regions_resized_to_the_input() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("mask.png");
        // 4x4 label image: value 0 (untagged) on the top row, 50 bottom-left, 200 bottom-right
        let img = image::GrayImage::from_fn(4, 4, |x, y| {
            image::Luma([if y == 0 {
                0
            } else if x < 2 {
                50
            } else {
                200
            }])
        });
        img.save(&p).unwrap();
        let r = Regions::from_mask(&p, 32, Some(0)).unwrap();
        assert_eq!(r.count(), 2);
        assert_eq!(r.index[0], None);
        assert_eq!(r.index[31 * 32], Some(0));
        assert_eq!(r.index[32 * 32 - 1], Some(1));
        let all = Regions::from_mask(&p, 32, None).unwrap();
        assert_eq!(all.count(), 3);
        assert_eq!(all.index[0], Some(0));
    }

    #[test]
    fn nyquist_and_off_bin_are_caught() {
        let st: StimulusConfig =
            toml::from_str("frequencies = [60.0, 7.3]\noff_bin = \"error\"").unwrap();
        let regions = Regions::from_config(&st, None, 32).unwrap();
        let errs = StimulusSpec::new(&st, regions, &mut Vec::new()).unwrap_err();
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(errs[0].contains("Nyquist"));
        assert!(errs[1].contains("between bins"));
    }

    #[test]
    fn frames_are_modulated_per_region() {
        let s = spec("");
        let rgb = vec![0.5f32; 3 * 32 * 32];
        let mut out = vec![0f32; 3 * 32 * 32];
        s.write_frame(&rgb, [0.0; 3], [1.0; 3], &[0.5, 1.0], None, &mut out);
        assert_eq!(out[0], 0.25);
        assert_eq!(out[31], 0.5);
    }

    #[test]
    fn noise_depends_on_seed_and_image_only() {
        let a: Vec<f64> = {
            let mut n = NoiseStream::new(7, "a.png", 1.0);
            (0..1000).map(|_| n.next_gaussian()).collect()
        };
        let mut n2 = NoiseStream::new(7, "a.png", 1.0);
        assert!(a.iter().all(|v| *v == n2.next_gaussian()));
        let mean = a.iter().sum::<f64>() / 1000.0;
        let var = a.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 999.0;
        assert!(mean.abs() < 0.1 && (var - 1.0).abs() < 0.15, "{mean} {var}");
        let mut n3 = NoiseStream::new(7, "b.png", 1.0);
        assert_ne!(a[0], n3.next_gaussian());
    }
}
