//! Shared entry work of the TC programs: parsing with a pull of non-linear headers.

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
use skiff_ebpf_common::{DropReason, Hook};

use crate::{
    frame::Frame,
    metrics,
    packet::{self, Ipv4Info, Packet, ParseError},
    service::Verdict,
};

/// The body of every TC program: parse, hand TCP/UDP to `stage` and other IPv4 packets to
/// policy alone (ICMP, SCTP, other protocols), count the outcome under `hook`, and drop
/// through the single drop exit with a stable reason.
#[inline(always)]
pub fn run(
    ctx: &TcContext,
    hook: Hook,
    stage: impl FnOnce(&TcContext, &Ipv4Info) -> Verdict,
) -> i32 {
    let len = ctx.len();
    let verdict = match parse(ctx) {
        Ok(Packet::Ipv4(info))
            if hook == Hook::FromPod && !crate::local::source_is_pod(ctx.ifindex(), &info) =>
        {
            Verdict::Drop(DropReason::SourceNotPod)
        }
        Ok(Packet::Ipv4(info)) if info.has_ports => stage(ctx, &info),
        Ok(Packet::Ipv4(info)) => crate::policy::portless(&info, hook),
        Ok(Packet::Other) => Verdict::Pass,
        Err(reason) => Verdict::Drop(reason),
    };
    match verdict {
        Verdict::Pass => {
            metrics::forwarded(hook, len);
            TC_ACT_OK as i32
        }
        Verdict::Redirected(r) => {
            metrics::redirected(hook, len);
            r
        }
        Verdict::Rejected(r) => {
            metrics::count(hook, DropReason::ServiceNoBackend.code(), len);
            r
        }
        Verdict::Drop(reason) => {
            metrics::count(hook, reason.code(), len);
            TC_ACT_SHOT as i32
        }
    }
}

/// Parses the packet, pulling headers that live in paged data into the linear part first.
#[inline(always)]
pub fn parse(ctx: &TcContext) -> Result<Packet, DropReason> {
    let len = ctx.len();
    let mut parsed = packet::parse(ctx.data(), ctx.data_end(), len);
    // Pull every header the parser may read at once (Ethernet, IPv4 and TCP with options, or
    // an ICMP error's header and the IPv4 header and 8 bytes it quotes), so one pull is always
    // enough.
    if let Err(ParseError::NeedPull(_)) = parsed
        && ctx.pull_data(len.min(14 + 60 + 8 + 60 + 8)).is_ok()
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
