//! Bounded fuzzing of the parsers that read operator input through the public API (the
//! in-crate `fuzz_tests` modules cover the kernel-facing decoders). `cargo xtask test` runs it
//! again with more cases.

mod fuzz_manifest;
