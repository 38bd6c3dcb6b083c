//! All integration tests, one binary, one module per area.

#[path = "it/analysis.rs"]
mod analysis;
#[path = "it/bad_input.rs"]
mod bad_input;
#[path = "it/cluster.rs"]
mod cluster;
#[path = "it/common.rs"]
mod common;
#[path = "it/gpu_kernels.rs"]
mod gpu_kernels;
#[path = "it/models.rs"]
mod models;
#[path = "it/pipeline.rs"]
mod pipeline;
#[path = "it/python.rs"]
mod python;
#[path = "it/resume.rs"]
mod resume;
#[path = "it/sources.rs"]
mod sources;
