//! The alert stage: new denied edges, expected denies, deny spikes, and the stage as the
//! daemon drives it.

mod edges;
mod expected;
mod spike;
mod spike_exports;
mod stage;
