//! The recording core: one image's frames through the network in batches, each distinct frame
//! once, each frame reading its distinct frame's activations.
//!
//! In: a preprocessed image (RGB in [0,1], `[3, S, S]`). Out: [`Recording`]: per tap each
//! channel's series over the N frames (kept as its distinct values and the frame map), plus the
//! unmodulated prediction.

use std::sync::Arc;

use candle_core::{Device, Tensor};

use super::{Network, Preprocess, Recorder};
use crate::stimulus::{Modulate, NoiseStream, StimulusSpec};

/// One tap's time series for one image, kept as each channel's value per distinct frame and
/// the map from frames to distinct frames (shared by every tap and image of a run): the series
/// over all N frames are gathered when they are analysed, one channel at a time, rather than
/// written out whole (16 MB per MobileNetV2 image at 240 frames, five times its distinct values).
#[derive(Debug, Clone)]
pub struct TapSeries {
    /// Index of the tap in the plan's tap list.
    pub tap: usize,
    /// Channels.
    pub channels: usize,
    /// `channels x distinct` values, channel-major.
    values: Vec<f32>,
    /// Frame -> distinct frame.
    map: Arc<[usize]>,
}

impl TapSeries {
    /// Tap `tap`'s series from its values per distinct frame (`distinct x channels`,
    /// frame-major, as the network gives them): frame `f` reads distinct frame `map[f]`.
    pub fn new(tap: usize, channels: usize, per_distinct: &[f32], map: Arc<[usize]>) -> Self {
        let distinct = per_distinct.len() / channels.max(1);
        Self::from_rows(tap, channels, per_distinct, channels, 0, distinct, map)
    }

    /// As [`TapSeries::new`], from `distinct` rows of `table` (each `width` values) whose
    /// columns `col..col + channels` are this tap's: a pass's outputs for every tap side by
    /// side, read in place.
    fn from_rows(
        tap: usize,
        channels: usize,
        table: &[f32],
        width: usize,
        col: usize,
        distinct: usize,
        map: Arc<[usize]>,
    ) -> Self {
        let mut values = vec![0f32; channels * distinct];
        for d in 0..distinct {
            let row = &table[d * width + col..][..channels];
            for (ch, v) in row.iter().enumerate() {
                values[ch * distinct + d] = *v;
            }
        }
        TapSeries {
            tap,
            channels,
            values,
            map,
        }
    }

    /// Frames N of every series.
    pub fn frames(&self) -> usize {
        self.map.len()
    }

    /// Channel `ch`'s series over the N frames into `out` (length N).
    pub fn series_into(&self, ch: usize, out: &mut [f32]) {
        let (v, map) = self.channel(ch);
        for (o, &d) in out.iter_mut().zip(map) {
            *o = v[d];
        }
    }

    /// Channel `ch`'s values per distinct frame and the frame map: frame `f` of its series is
    /// `values[map[f]]`.
    pub fn channel(&self, ch: usize) -> (&[f32], &[usize]) {
        let distinct = self.values.len() / self.channels.max(1);
        (&self.values[ch * distinct..(ch + 1) * distinct], &self.map)
    }

    /// Every channel's series, `channels x N`, channel-major.
    pub fn to_matrix(&self) -> Vec<f32> {
        let n = self.frames();
        let mut m = vec![0f32; self.channels * n];
        for (ch, out) in m.chunks_exact_mut(n.max(1)).enumerate() {
            self.series_into(ch, out);
        }
        m
    }
}

/// Everything recorded for one image.
#[derive(Debug, Clone)]
pub struct Recording {
    /// Predicted class of the unmodulated image.
    pub pred: i64,
    /// Its softmax probability.
    pub prob: f32,
    /// Forward passes run (distinct frames).
    pub distinct_frames: usize,
    /// Seconds spent building this image's frames (part of the time of its forward passes,
    /// reported as a stage of its own).
    pub stimulus_seconds: f64,
    /// Per recorded tap.
    pub taps: Vec<TapSeries>,
}

/// Passes of at most `batch` frames for `n` frames, as even as possible: 49 frames at 16 a pass
/// run as 13, 12, 12 and 12 rather than 16, 16, 16 and a pass of 1.
pub fn pass_sizes(n: usize, batch: usize) -> Vec<usize> {
    let passes = n.div_ceil(batch.max(1)).max(1);
    (0..passes)
        .map(|i| n / passes + usize::from(i < n % passes))
        .collect()
}

/// Runs the stimulus of `rgb` through `net`, at most `batch` frames a pass, in passes of even
/// size; the unmodulated image (for the prediction) rides along in the last pass as one more
/// frame. Frames do not affect each other in a pass (every kernel is per frame), so the
/// results are those of separate passes.
#[allow(clippy::too_many_arguments)]
pub fn record(
    net: &Network,
    taps: &[String],
    stim: &StimulusSpec,
    pre: Preprocess,
    rgb: &[f32],
    image_id: &str,
    batch: usize,
) -> candle_core::Result<Recording> {
    let s = stim.regions.size;
    let frame_len = 3 * s * s;
    let (distinct, map) = stim.distinct_frames();
    let map: Arc<[usize]> = map.into();
    let mut noise =
        (stim.noise_std > 0.0).then(|| NoiseStream::new(stim.noise_seed, image_id, stim.noise_std));
    // per tap, per distinct frame, channels values
    let mut per_frame: Vec<Vec<f32>> = vec![Vec::new(); taps.len()];
    let mut channels = vec![0usize; taps.len()];
    let sizes = pass_sizes(distinct.len(), batch);
    // frames channels last, as the layers take them (interleaved here from each planar
    // frame: candle's permuted copy of a pass's frames took 2 % of the quickstart's time)
    let mut buf = vec![0f32; (sizes[0] + 1) * frame_len];
    let mut plane = vec![0f32; frame_len];
    let ones = vec![1f32; stim.regions.count()];
    let mut probs = Vec::new();
    let mut start = 0;
    let mut stimulus_seconds = 0.0;
    for (pass, &b) in sizes.iter().enumerate() {
        let last = pass + 1 == sizes.len();
        let started = std::time::Instant::now();
        for (i, tuple) in distinct[start..start + b].iter().enumerate() {
            stim.write_frame(rgb, pre.mean, pre.std, tuple, noise.as_mut(), &mut plane);
            interleave(&plane, &mut buf[i * frame_len..(i + 1) * frame_len]);
        }
        start += b;
        // the plain image after the last pass's frames; no noise stream, whatever
        // stimulus.noise_std says
        let frames = b + usize::from(last);
        if last {
            stim.write_frame(rgb, pre.mean, pre.std, &ones, None, &mut plane);
            interleave(&plane, &mut buf[b * frame_len..(b + 1) * frame_len]);
        }
        let x = Tensor::from_slice(&buf[..frames * frame_len], (frames, s, s, 3), &Device::Cpu)?;
        stimulus_seconds += started.elapsed().as_secs_f64();
        let mut rec = Recorder::new(taps);
        let logits = net.forward_nhwc(&x, &mut rec)?;
        for (t, v) in rec.finish()?.into_iter().enumerate() {
            channels[t] = v.dim(1)?;
            per_frame[t].extend(v.narrow(0, 0, b)?.flatten_all()?.to_vec1::<f32>()?);
        }
        if last {
            probs = candle_nn::ops::softmax_last_dim(&logits.narrow(0, b, 1)?)?
                .flatten_all()?
                .to_vec1::<f32>()?;
        }
    }
    let (pred, prob) =
        probs.iter().enumerate().fold(
            (0usize, f32::MIN),
            |a, (i, p)| if *p > a.1 { (i, *p) } else { a },
        );
    let taps = per_frame
        .iter()
        .enumerate()
        .map(|(t, vals)| TapSeries::new(t, channels[t], vals, map.clone()))
        .collect();
    Ok(Recording {
        pred: pred as i64,
        prob,
        distinct_frames: distinct.len(),
        stimulus_seconds,
        taps,
    })
}

/// The stimulus on a GPU: the region index and the distinct scalar tuples (plus a tuple of ones
/// for the unmodulated frame), uploaded once; each image is uploaded once and its frames are
/// built on the device as `image x scalar map`. With pixel noise the frames are built on the
/// CPU (the noise stream is sequential), then uploaded.
pub struct DeviceStimulus {
    /// `[H*W]` u32: the tuple column of each pixel (untagged pixels read the last, all ones).
    index: Tensor,
    /// `[D+1, R+1]`: the distinct tuples, then ones; a column of ones for untagged pixels.
    tuples: Tensor,
    /// Distinct frames D.
    distinct: usize,
    /// The tuples on the host, kept only when frames are built on the CPU (pixel noise).
    host_tuples: Vec<Vec<f32>>,
    /// Frame -> distinct frame.
    map: Arc<[usize]>,
}

impl DeviceStimulus {
    /// Uploads `stim`'s regions and tuples to `device`.
    pub fn new(stim: &StimulusSpec, device: &Device) -> candle_core::Result<Self> {
        let (distinct, map) = stim.distinct_frames();
        let r = stim.regions.count();
        let index: Vec<u32> = stim
            .regions
            .index
            .iter()
            .map(|i| i.map_or(r as u32, |i| i as u32))
            .collect();
        let mut rows = Vec::with_capacity((distinct.len() + 1) * (r + 1));
        for t in distinct.iter().chain(std::iter::once(&vec![1f32; r])) {
            rows.extend_from_slice(t);
            rows.push(1.0);
        }
        Ok(DeviceStimulus {
            index: Tensor::new(index.as_slice(), device)?,
            tuples: Tensor::from_vec(rows, (distinct.len() + 1, r + 1), device)?,
            distinct: distinct.len(),
            host_tuples: if stim.noise_std > 0.0 {
                distinct
            } else {
                Vec::new()
            },
            map: map.into(),
        })
    }

    /// Image `rgb`'s distinct frames, then its unmodulated frame: `[D+1, S, S, 3]` f32 on the
    /// device, channels last as the network's layers take them (built in that layout, rather
    /// than permuted and copied before the first layer: on an H100 that copy cost MobileNetV2
    /// a quarter of its pass), equal to [`StimulusSpec::write_frame`]'s (the same f32
    /// operations in the same order; the scalar map is a gather, not a product).
    pub fn frames(
        &self,
        stim: &StimulusSpec,
        pre: Preprocess,
        rgb: &[f32],
        image_id: &str,
    ) -> candle_core::Result<Tensor> {
        let s = stim.regions.size;
        let hw = s * s;
        let dev = self.tuples.device();
        let d = self.distinct + 1;
        if stim.noise_std > 0.0 {
            let mut noise = NoiseStream::new(stim.noise_seed, image_id, stim.noise_std);
            let mut frame = vec![0f32; 3 * hw];
            let mut buf = vec![0f32; d * 3 * hw];
            let ones = vec![1f32; stim.regions.count()];
            let tuples = self.host_tuples.iter().chain(std::iter::once(&ones));
            for (i, tuple) in tuples.enumerate() {
                let n = (i < self.distinct).then_some(&mut noise);
                stim.write_frame(rgb, pre.mean, pre.std, tuple, n, &mut frame);
                interleave(&frame, &mut buf[i * 3 * hw..(i + 1) * 3 * hw]);
            }
            return Tensor::from_vec(buf, (d, s, s, 3), dev);
        }
        // [D+1, H*W, 1]: every pixel's scalar in every frame
        let scalars = self.tuples.index_select(&self.index, 1)?.unsqueeze(2)?;
        // the image with its channels interleaved, [1, H*W, 3]
        let interleaved = |f: &dyn Fn(usize, f32) -> f32| {
            let mut z = vec![0f32; 3 * hw];
            for c in 0..3 {
                for (p, v) in rgb[c * hw..(c + 1) * hw].iter().enumerate() {
                    z[p * 3 + c] = f(c, *v);
                }
            }
            Tensor::from_vec(z, (1, hw, 3), dev)
        };
        let frames = match stim.modulate {
            Modulate::Normalized => {
                let z = interleaved(&|c, v| (v - pre.mean[c]) / pre.std[c])?;
                z.broadcast_mul(&scalars)?
            }
            Modulate::Pixel => {
                let x = interleaved(&|_, v| v)?;
                let m = Tensor::from_slice(&pre.mean, (1, 1, 3), dev)?;
                let sd = Tensor::from_slice(&pre.std, (1, 1, 3), dev)?;
                x.broadcast_mul(&scalars)?
                    .broadcast_sub(&m)?
                    .broadcast_div(&sd)?
            }
        };
        frames.reshape((d, s, s, 3))
    }
}

/// Records several images at once on a GPU: their frames (built there, see [`DeviceStimulus`])
/// go through the network `batch` frames at a time across images, so that small inputs such as
/// CIFAR's fill the card. Without `on_device` this is [`record`] image by image (on the CPU each
/// image's batches are then independent of which images share a worker).
#[allow(clippy::too_many_arguments)]
pub fn record_many(
    net: &Network,
    taps: &[String],
    stim: &StimulusSpec,
    pre: Preprocess,
    images: &[(&[f32], &str)],
    batch: usize,
    on_device: Option<&DeviceStimulus>,
) -> candle_core::Result<Vec<Recording>> {
    let Some(ds) = on_device else {
        return images
            .iter()
            .map(|(rgb, id)| record(net, taps, stim, pre, rgb, id, batch))
            .collect();
    };
    let per_image = ds.distinct + 1;
    let batch = batch.max(1);
    // every pass's outputs on the host, one row per frame across images: each tap's channels
    // side by side, then the logits (`width` values a row, the same for every pass)
    let mut table = HostTable::new(ds.tuples.device());
    let total_rows = images.len() * per_image;
    let mut channels = vec![0usize; taps.len()];
    let mut width = 0usize;
    let mut pending: Vec<Tensor> = Vec::new();
    let mut pending_frames = 0usize;
    let mut run = |x: &Tensor, table: &mut HostTable| -> candle_core::Result<()> {
        let mut rec = Recorder::new(taps);
        let l = super::profile::op("forward", x, || net.forward_nhwc(x, &mut rec))?;
        let mut outs = rec.finish()?;
        for (t, v) in outs.iter().enumerate() {
            channels[t] = v.dim(1)?;
        }
        // one copy back per pass: every tap and the logits side by side, `[B, sum C + classes]`,
        // as one flat block (rows split out and regrouped per tap cost MobileNetV2 up to 50 ms
        // a pass on the host, most of it in fresh pages)
        outs.push(l);
        let all = Tensor::cat(&outs, 1)?;
        width = all.dim(1)?;
        super::profile::op("copy back", x, || table.append(&all, total_rows * width))
    };
    let mut stimulus_seconds = Vec::with_capacity(images.len());
    for (i, (rgb, id)) in images.iter().enumerate() {
        let started = std::time::Instant::now();
        pending.push(super::profile::op("frames", &ds.tuples, || {
            ds.frames(stim, pre, rgb, id)
        })?);
        stimulus_seconds.push(started.elapsed().as_secs_f64());
        pending_frames += per_image;
        let last = i + 1 == images.len();
        while pending_frames >= batch || (last && pending_frames > 0) {
            let all = Tensor::cat(&pending, 0)?;
            let take = pending_frames.min(batch);
            run(&all.narrow(0, 0, take)?, &mut table)?;
            pending.clear();
            pending_frames -= take;
            if pending_frames > 0 {
                pending.push(all.narrow(0, take, pending_frames)?);
            }
        }
    }
    let tap_columns: usize = channels.iter().sum();
    let table = table.as_slice()?;
    let mut out = Vec::with_capacity(images.len());
    for i in 0..images.len() {
        let rows = &table[i * per_image * width..(i + 1) * per_image * width];
        let plain = &rows[ds.distinct * width + tap_columns..][..width - tap_columns];
        let (pred, prob) = softmax_argmax(plain);
        let mut col = 0;
        let taps = channels
            .iter()
            .enumerate()
            .map(|(t, &c)| {
                let series =
                    TapSeries::from_rows(t, c, rows, width, col, per_image, ds.map.clone());
                col += c;
                series
            })
            .collect();
        out.push(Recording {
            pred,
            prob,
            distinct_frames: ds.distinct,
            stimulus_seconds: stimulus_seconds[i],
            taps,
        });
    }
    Ok(out)
}

/// Where a group's passes are copied back to, one after the other: page-locked memory kept per
/// thread on a GPU (`cuda_ops::PinnedTable`, unless `FREQTAG_GPU_PAGEABLE=1`), else a vector.
enum HostTable {
    Vec(Vec<f32>),
    #[cfg(feature = "cuda")]
    Pinned(super::cuda_ops::PinnedTable),
}

impl HostTable {
    fn new(dev: &Device) -> Self {
        #[cfg(feature = "cuda")]
        if dev.is_cuda() && super::cuda_ops::pinned_copy_back() {
            return HostTable::Pinned(super::cuda_ops::PinnedTable::new());
        }
        let _ = dev;
        HostTable::Vec(Vec::new())
    }

    /// Appends `x`'s values (`total`: how many the table will hold in the end).
    fn append(&mut self, x: &Tensor, total: usize) -> candle_core::Result<()> {
        match self {
            HostTable::Vec(v) => {
                if v.is_empty() {
                    v.reserve(total);
                }
                v.extend_from_slice(&x.flatten_all()?.to_vec1::<f32>()?);
                Ok(())
            }
            #[cfg(feature = "cuda")]
            HostTable::Pinned(t) => {
                if let Err(e) = t.reserve_for(x, total) {
                    // no more page-locked memory: on in ordinary memory, with what came back
                    static ONCE: std::sync::Once = std::sync::Once::new();
                    ONCE.call_once(
                        || tracing::warn!(error = %e, "copying passes back into ordinary memory"),
                    );
                    let mut v = Vec::with_capacity(total);
                    v.extend_from_slice(t.as_slice()?);
                    *self = HostTable::Vec(v);
                    return self.append(x, total);
                }
                t.append(x, total)
            }
        }
    }

    fn as_slice(&self) -> candle_core::Result<&[f32]> {
        match self {
            HostTable::Vec(v) => Ok(v),
            #[cfg(feature = "cuda")]
            HostTable::Pinned(t) => t.as_slice(),
        }
    }
}

/// A frame's three channel planes `[3, H*W]` into interleaved channels `[H*W, 3]`.
fn interleave(planes: &[f32], out: &mut [f32]) {
    let hw = planes.len() / 3;
    let (r, rest) = planes.split_at(hw);
    let (g, b) = rest.split_at(hw);
    for (((px, r), g), b) in out.chunks_exact_mut(3).zip(r).zip(g).zip(b) {
        px.copy_from_slice(&[*r, *g, *b]);
    }
}

/// The class with the largest logit and its softmax probability (computed in f64).
fn softmax_argmax(logits: &[f32]) -> (i64, f32) {
    let max = logits.iter().fold(f32::MIN, |a, v| a.max(*v));
    let sum: f64 = logits.iter().map(|v| ((v - max) as f64).exp()).sum();
    let (pred, best) =
        logits.iter().enumerate().fold(
            (0usize, f32::MIN),
            |a, (i, v)| if *v > a.1 { (i, *v) } else { a },
        );
    (pred as i64, (((best - max) as f64).exp() / sum) as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_argmax_matches_a_direct_softmax() {
        let l = [1.0f32, 3.5, -2.0, 3.0];
        let e: Vec<f64> = l.iter().map(|v| (*v as f64).exp()).collect();
        let p = e[1] / e.iter().sum::<f64>();
        let (pred, prob) = softmax_argmax(&l);
        assert_eq!(pred, 1);
        assert!((prob as f64 - p).abs() < 1e-7, "{prob} vs {p}");
    }

    #[test]
    fn passes_are_even_and_cover_every_frame() {
        assert_eq!(pass_sizes(49, 16), [13, 12, 12, 12]);
        assert_eq!(pass_sizes(49, 32), [25, 24]);
        assert_eq!(pass_sizes(49, 64), [49]);
        assert_eq!(pass_sizes(1, 8), [1]);
        for n in 1..60 {
            for batch in 1..20 {
                let p = pass_sizes(n, batch);
                assert_eq!(p.iter().sum::<usize>(), n);
                assert_eq!(p.len(), n.div_ceil(batch));
                assert!(p.iter().all(|&b| b <= batch && b + 1 >= p[0]));
            }
        }
    }
}
