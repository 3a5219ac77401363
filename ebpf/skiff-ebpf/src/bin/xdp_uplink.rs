//! XDP program on the node's uplink: the earliest point a packet from the network is seen.
//!
//! Validates headers and drops malformed packets with their reason before the kernel allocates
//! an skb, and is the NodePort fast path: a flow to a backend on another node (and its
//! replies) is translated and sent straight back out of the uplink (`XDP_TX`); everything
//! else goes on to the kernel and the TC hook (`skiff_ebpf::service::xdp_nodeport`).

#![no_std]
#![no_main]

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use skiff_ebpf::{
    metrics,
    packet::{self, Packet, ParseError},
    service::{self, Verdict},
};
use skiff_ebpf_common::{DropReason, Hook};

const HOOK: Hook = Hook::XdpUplink;

#[xdp]
pub fn xdp_uplink(ctx: XdpContext) -> u32 {
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let len = (data_end - data) as u32;
    let verdict = match packet::parse(data, data_end, len) {
        Ok(Packet::Ipv4(info)) if info.has_ports => service::xdp_nodeport(&ctx, &info),
        Ok(_) => Verdict::Pass,
        Err(ParseError::Drop(reason)) => Verdict::Drop(reason),
        // XDP sees the whole frame, so a header past `data_end` is simply truncated.
        Err(ParseError::NeedPull(_)) => Verdict::Drop(DropReason::MalformedL4),
    };
    match verdict {
        Verdict::Pass => {
            metrics::forwarded(HOOK, len);
            xdp_action::XDP_PASS
        }
        Verdict::Redirected(action) => {
            metrics::redirected(HOOK, len);
            action as u32
        }
        // Never made at XDP (rejections are TC's); counted like TC counts them.
        Verdict::Rejected(action) => {
            metrics::count(HOOK, DropReason::ServiceNoBackend.code(), len);
            action as u32
        }
        Verdict::Drop(reason) => drop(reason, len),
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
