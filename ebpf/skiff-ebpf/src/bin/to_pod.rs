//! TC program on a pod's host-side veth, egress direction: every packet the pod receives.
//!
//! Restores the frontend as the source of replies from backends elsewhere (see
//! `skiff_ebpf::service::to_pod`). Ingress policy attaches here as it is built.

#![no_std]
#![no_main]

use aya_ebpf::{macros::classifier, programs::TcContext};
use skiff_ebpf::{service, tc};
use skiff_ebpf_common::Hook;

#[classifier]
pub fn to_pod(ctx: TcContext) -> i32 {
    tc::run(&ctx, Hook::ToPod, service::to_pod)
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
