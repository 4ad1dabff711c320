//! Kernel side of deny-observer: a tracepoint on `skb:kfree_skb` that counts every dropped
//! packet per flow, exactly, in a per-CPU LRU map; and the connection programs that count
//! accepted TCP connections and UDP flows per edge.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod connections;
#[cfg(target_arch = "bpf")]
mod program;

#[cfg(not(target_arch = "bpf"))]
fn main() {}
