//! XDP program on the node's uplink: the earliest point a packet from the network is seen.
//!
//! Today: validate headers, count, drop malformed packets with their reason before the kernel
//! allocates an skb. The NodePort fast path attaches here as it is built.

#![no_std]
#![no_main]

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use skiff_ebpf::{
    metrics,
    packet::{self, ParseError},
};
use skiff_ebpf_common::{DropReason, Hook};

const HOOK: Hook = Hook::XdpUplink;

#[xdp]
pub fn xdp_uplink(ctx: XdpContext) -> u32 {
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let len = (data_end - data) as u32;
    match packet::parse(data, data_end, len) {
        Ok(_) => {
            metrics::forwarded(HOOK, len);
            xdp_action::XDP_PASS
        }
        Err(ParseError::Drop(reason)) => drop(reason, len),
        // XDP sees the whole frame, so a header past `data_end` is simply truncated.
        Err(ParseError::NeedPull(_)) => drop(DropReason::MalformedL4, len),
    }
}

/// The single drop exit of this program: counts the reason, then drops.
#[inline(always)]
fn drop(reason: DropReason, len: u32) -> u32 {
    metrics::count(HOOK, reason.code(), len);
    xdp_action::XDP_DROP
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
