//! Kernel side of deny-observer: a tracepoint on `skb:kfree_skb` that counts every dropped
//! packet per flow, exactly, in an LRU map; and the connection programs that count
//! accepted TCP connections and UDP flows per edge.
#![cfg_attr(target_arch = "bpf", no_std)]
// The BPF target has no atomic read-modify-write types (`AtomicU64::fetch_add`), only the
// intrinsic, which LLVM lowers to the BPF atomic add.
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod connections;
#[cfg(target_arch = "bpf")]
mod program;

#[cfg(not(target_arch = "bpf"))]
fn main() {}
