//! The NetworkPolicy engine against the upstream conformance corpus and property tests.

mod netpol_corpus;
mod netpol_props;
