//! Placeholder until the capture program lands.
use aya_ebpf::{macros::tracepoint, programs::TracePointContext};

#[tracepoint]
pub fn kfree_skb(_ctx: TracePointContext) -> u32 {
    0
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
