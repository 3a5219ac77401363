//! TC program on the node's uplink, ingress direction: packets arriving from the network.
//!
//! NodePort and external-IP traffic from outside the cluster, and the replies to it from
//! backends on other nodes (see `skiff_ebpf::service::from_netdev`).

#![no_std]
#![no_main]

use aya_ebpf::{macros::classifier, programs::TcContext};
use skiff_ebpf::{service, tc};
use skiff_ebpf_common::Hook;

#[classifier]
pub fn from_netdev(ctx: TcContext) -> i32 {
    tc::run(&ctx, Hook::FromNetdev, service::from_netdev)
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
