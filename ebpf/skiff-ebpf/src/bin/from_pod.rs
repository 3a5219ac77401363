//! TC program on a pod's host-side veth, ingress direction: every packet the pod sends.
//!
//! Validates headers (malformed packets are dropped with their reason), then does service
//! translation (see `skiff_ebpf::service::from_pod`). Egress policy attaches here as it is built.

#![no_std]
#![no_main]

use aya_ebpf::{macros::classifier, programs::TcContext};
use skiff_ebpf::{service, tc};
use skiff_ebpf_common::Hook;

#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    tc::run(&ctx, Hook::FromPod, service::from_pod)
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
