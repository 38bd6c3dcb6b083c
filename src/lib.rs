//! freqtag: frequency tagging of CNN neurons at scale.
//!
//! Regions of an image flicker in contrast at their own frequencies over N frames; every frame
//! goes through the network; each neuron's activation over the frames is Fourier transformed and
//! scored at the tagged frequencies, their harmonics and intermodulation terms (see METHOD.md in
//! the project's shared notes and README.md). Modules follow the data:
//! [`source`] -> [`stimulus`] -> [`model`] -> [`spectrum`] -> [`score`] -> [`sink`], wired by
//! [`dataflow`]; [`config`] compiles pipeline files.

pub mod cli;
pub mod cluster;
pub mod config;
pub mod dataflow;
pub mod error;
pub mod malloc;
pub mod model;
pub mod prune;
pub mod report;
pub mod resume;
pub mod score;
pub mod sink;
pub mod source;
pub mod spectrum;
pub mod stimulus;

pub use error::{Error, Result};
