//! Shared pieces of skiff's eBPF programs: one module per concern (the cilium `lib/` habit).
//! Each attach point is a binary under `src/bin/` that composes these modules.
//!
//! Nothing here may panic: the verifier rejects any program with a reachable panic path, so
//! every packet access is bounds-checked against `data_end` first.

#![no_std]

pub mod ct;
pub mod fib;
pub mod frame;
pub mod lb;
pub mod local;
pub mod metrics;
pub mod nat;
pub mod packet;
pub mod policy;
pub mod reject;
pub mod service;
pub mod tc;

/// Shared by every program binary. Unreachable in a verified program: the verifier rejects any
/// path that could get here.
#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
