//! TODO

pub mod events;
