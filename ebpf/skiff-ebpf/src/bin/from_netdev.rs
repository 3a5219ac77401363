//! TC program on the node's uplink, ingress direction: packets arriving from the network.
//!
//! NodePort and external-IP traffic from outside the cluster, and the replies to it from
//! backends on other nodes (see `skiff_ebpf::service::from_netdev`).

#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::classifier,
    programs::TcContext,
};
use skiff_ebpf::{
    metrics,
    packet::Packet,
    service::{self, Verdict},
    tc,
};
use skiff_ebpf_common::{DropReason, Hook};

const HOOK: Hook = Hook::FromNetdev;

#[classifier]
pub fn from_netdev(ctx: TcContext) -> i32 {
    let len = ctx.len();
    let info = match tc::parse(&ctx) {
        Ok(Packet::Ipv4(info)) if info.has_ports => info,
        Ok(_) => {
            metrics::forwarded(HOOK, len);
            return TC_ACT_OK;
        }
        Err(reason) => return drop(reason, len),
    };
    match service::from_netdev(&ctx, &info) {
        Verdict::Pass => {
            metrics::forwarded(HOOK, len);
            TC_ACT_OK
        }
        Verdict::Redirected(r) => {
            metrics::forwarded(HOOK, len);
            r
        }
        Verdict::Rejected(r) => {
            metrics::count(HOOK, DropReason::ServiceNoBackend.code(), len);
            r
        }
        Verdict::Drop(reason) => drop(reason, len),
    }
}

/// The single drop exit of this program: counts the reason, then drops.
#[inline(always)]
fn drop(reason: DropReason, len: u32) -> i32 {
    metrics::count(HOOK, reason.code(), len);
    TC_ACT_SHOT
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
