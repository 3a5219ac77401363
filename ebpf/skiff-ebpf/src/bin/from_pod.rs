//! TC program on a pod's host-side veth, ingress direction: every packet the pod sends.
//!
//! Today: validate headers, count, drop malformed packets with their reason. Service
//! translation and egress policy attach here as they are built.

#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::classifier,
    programs::TcContext,
};
use skiff_ebpf::{
    metrics,
    packet::{self, ParseError},
};
use skiff_ebpf_common::Hook;

const HOOK: Hook = Hook::FromPod;

#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    let len = ctx.len();
    let mut parsed = packet::parse(ctx.data(), ctx.data_end(), len);
    if let Err(ParseError::NeedPull(need)) = parsed {
        // Headers live partly in paged data: make them linear and look again.
        if ctx.pull_data(need).is_ok() {
            parsed = packet::parse(ctx.data(), ctx.data_end(), len);
        }
    }
    match parsed {
        Ok(_) => {
            metrics::forwarded(HOOK, len);
            TC_ACT_OK
        }
        Err(ParseError::Drop(reason)) => drop(reason.code(), len),
        // Still not linear after a pull: the kernel could not make it so; treat as malformed.
        Err(ParseError::NeedPull(_)) => {
            drop(skiff_ebpf_common::DropReason::MalformedL4.code(), len)
        }
    }
}

/// The single drop exit of this program: counts the reason, then drops.
#[inline(always)]
fn drop(reason: u8, len: u32) -> i32 {
    metrics::count(HOOK, reason, len);
    TC_ACT_SHOT
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
