//! Helpers shared by the xtask integration tests. They panic with context on failure, the way
//! the tests themselves do.
#![allow(
    clippy::expect_used,
    clippy::unwrap_used,
    reason = "test helpers: a panic with context is their failure report"
)]

pub mod promstack;
pub mod webhook;
