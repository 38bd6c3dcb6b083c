//! The recording core: one image's frames through the network in batches, each distinct frame
//! once, activations scattered back to all N frames.
//!
//! In: a preprocessed image (RGB in [0,1], `[3, S, S]`). Out: [`Recording`]: per tap a
//! `channels x N` matrix (channel-major), plus the unmodulated prediction.

use candle_core::{Device, Tensor};

use super::{Network, Preprocess, Recorder};
use crate::stimulus::{NoiseStream, StimulusSpec};

/// One tap's time series for one image.
#[derive(Debug, Clone)]
pub struct TapSeries {
    /// Index of the tap in the plan's tap list.
    pub tap: usize,
    /// Channels.
    pub channels: usize,
    /// `channels x frames` values, channel-major.
    pub data: Vec<f32>,
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
    /// Per recorded tap.
    pub taps: Vec<TapSeries>,
}

/// Runs the stimulus of `rgb` through `net`, `batch` frames at a time.
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
    let mut noise =
        (stim.noise_std > 0.0).then(|| NoiseStream::new(stim.noise_seed, image_id, stim.noise_std));
    // per tap, per distinct frame, channels values
    let mut per_frame: Vec<Vec<f32>> = vec![Vec::new(); taps.len()];
    let mut channels = vec![0usize; taps.len()];
    let mut buf = vec![0f32; batch.min(distinct.len()) * frame_len];
    for chunk in distinct.chunks(batch) {
        let b = chunk.len();
        for (i, tuple) in chunk.iter().enumerate() {
            stim.write_frame(
                rgb,
                pre.mean,
                pre.std,
                tuple,
                noise.as_mut(),
                &mut buf[i * frame_len..(i + 1) * frame_len],
            );
        }
        let x = Tensor::from_slice(&buf[..b * frame_len], (b, 3, s, s), &Device::Cpu)?;
        let mut rec = Recorder::new(taps);
        net.forward(&x, &mut rec)?;
        for (t, v) in rec.finish()?.into_iter().enumerate() {
            channels[t] = v.dim(1)?;
            per_frame[t].extend(v.flatten_all()?.to_vec1::<f32>()?);
        }
    }
    // the unmodulated image for the prediction
    let ones = vec![1f32; stim.regions.count()];
    let mut plain = vec![0f32; frame_len];
    // no noise stream: the plain image, whatever stimulus.noise_std says
    stim.write_frame(rgb, pre.mean, pre.std, &ones, None, &mut plain);
    let x = Tensor::from_slice(&plain, (1, 3, s, s), &Device::Cpu)?;
    let logits = net.forward(&x, &mut Recorder::new(&[]))?;
    let probs = candle_nn::ops::softmax_last_dim(&logits)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let (pred, prob) =
        probs.iter().enumerate().fold(
            (0usize, f32::MIN),
            |a, (i, p)| if *p > a.1 { (i, *p) } else { a },
        );
    let n = map.len();
    let taps = per_frame
        .into_iter()
        .enumerate()
        .map(|(t, vals)| {
            let c = channels[t];
            let mut data = vec![0f32; c * n];
            for (frame, d) in map.iter().enumerate() {
                for ch in 0..c {
                    data[ch * n + frame] = vals[d * c + ch];
                }
            }
            TapSeries {
                tap: t,
                channels: c,
                data,
            }
        })
        .collect();
    Ok(Recording {
        pred: pred as i64,
        prob,
        distinct_frames: distinct.len(),
        taps,
    })
}
