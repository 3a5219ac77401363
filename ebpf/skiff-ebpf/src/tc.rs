//! Shared entry work of the TC programs: parsing with a pull of non-linear headers.

use aya_ebpf::programs::TcContext;
use skiff_ebpf_common::DropReason;

use crate::packet::{self, Packet, ParseError};

/// Parses the packet, pulling headers that live in paged data into the linear part first.
#[inline(always)]
pub fn parse(ctx: &TcContext) -> Result<Packet, DropReason> {
    let len = ctx.len();
    let mut parsed = packet::parse(ctx.data(), ctx.data_end(), len);
    // Pull every header the parser may read at once (Ethernet, IPv4 and TCP with options),
    // so one pull is always enough.
    if let Err(ParseError::NeedPull(_)) = parsed
        && ctx.pull_data(len.min(14 + 60 + 60)).is_ok()
    {
        parsed = packet::parse(ctx.data(), ctx.data_end(), len);
    }
    match parsed {
        Ok(p) => Ok(p),
        Err(ParseError::Drop(reason)) => Err(reason),
        // Still not linear after a pull: the kernel could not make it so; treat as malformed.
        Err(ParseError::NeedPull(_)) => Err(DropReason::MalformedL4),
    }
}
