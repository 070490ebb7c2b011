//! Helpers shared by the worker's integration tests.
#![allow(dead_code)]

pub mod http;
pub mod jobs;
pub mod models;
pub mod process;
