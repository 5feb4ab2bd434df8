//! A store that reports SIGBUS instead of dying of it, to test the protection
//! with real CPU stores (a million refused writes cannot each cost a process).
//!
//! The store is one known instruction in a small assembly function; a SIGBUS
//! handler that finds the faulting instruction pointer on it moves the
//! instruction pointer past it and sets the return register to 1 — the way a
//! kernel's exception table recovers from a faulting user-copy. Any other
//! SIGBUS gets the previous disposition back and faults again.

use std::sync::{Once, OnceLock};

use crate::entry::Slots;
use crate::Error;

/// What became of a stray store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreOutcome {
    /// The store reached memory.
    Stored,
    /// The kernel refused it (SIGBUS: the page is write-protected).
    Sigbus,
}

#[cfg(target_arch = "x86_64")]
std::arch::global_asm!(
    ".pushsection .text.vinfra_shm_try_store,\"ax\",@progbits",
    ".globl vinfra_shm_try_store",
    ".type vinfra_shm_try_store,@function",
    "vinfra_shm_try_store:",
    "xor eax, eax",
    ".globl vinfra_shm_try_store_insn",
    "vinfra_shm_try_store_insn:",
    "mov qword ptr [rdi], rsi",
    ".globl vinfra_shm_try_store_resume",
    "vinfra_shm_try_store_resume:",
    "ret",
    ".size vinfra_shm_try_store, .-vinfra_shm_try_store",
    ".popsection",
);

#[cfg(target_arch = "x86_64")]
extern "C" {
    fn vinfra_shm_try_store(addr: *mut u64, value: u64) -> u64;
    static vinfra_shm_try_store_insn: u8;
    static vinfra_shm_try_store_resume: u8;
}

#[cfg(target_arch = "x86_64")]
/// The SIGBUS disposition before ours (read in the handler: an atomic load).
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();

#[cfg(target_arch = "x86_64")]
extern "C" fn on_sigbus(_sig: libc::c_int, _info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid ucontext_t for an SA_SIGINFO handler;
    // the label addresses are link-time constants; PREVIOUS is set before
    // the handler is installed.
    unsafe {
        let uc = ctx.cast::<libc::ucontext_t>();
        let gregs = &mut (*uc).uc_mcontext.gregs;
        let insn = &raw const vinfra_shm_try_store_insn as i64;
        if gregs[libc::REG_RIP as usize] == insn {
            gregs[libc::REG_RIP as usize] = &raw const vinfra_shm_try_store_resume as i64;
            gregs[libc::REG_RAX as usize] = 1;
            return;
        }
        // Not our store: put back whoever handled SIGBUS before and let the
        // instruction fault again into it.
        let prev = PREVIOUS.get().copied().unwrap_or_else(|| {
            let mut dfl: libc::sigaction = std::mem::zeroed();
            dfl.sa_sigaction = libc::SIG_DFL;
            dfl
        });
        libc::sigaction(libc::SIGBUS, &prev, std::ptr::null_mut());
    }
}

#[cfg(target_arch = "x86_64")]
fn install() -> Result<(), Error> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        // SAFETY: sigaction structs are plain data and the calls get valid
        // pointers to them.
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_sigbus as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut old) == 0 {
                let _ = PREVIOUS.set(old);
            }
            if libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut()) != 0 {
                result = Err(Error::io("installing the SIGBUS handler")(
                    std::io::Error::last_os_error(),
                ));
            }
        }
    });
    result
}

/// Stores `value` at `addr`, which must be an aligned word inside `slots`'
/// mapping (the caller checked; `slots` keeps the mapping alive).
pub(crate) fn store(addr: usize, value: u64, slots: &Slots) -> Result<StoreOutcome, Error> {
    let base = slots.base();
    if addr < base || addr + 8 > base + slots.layout().table_bytes() || !addr.is_multiple_of(8) {
        return Err(Error::Invalid(format!(
            "{addr:#x} is not a word of the table"
        )));
    }
    #[cfg(target_arch = "x86_64")]
    {
        install()?;
        // SAFETY: `addr` is an aligned word of a live shared mapping that
        // other processes access only atomically; an 8-byte aligned `mov` is
        // atomic on x86-64. A protection fault is recovered by `on_sigbus`.
        let faulted = unsafe { vinfra_shm_try_store(addr as *mut u64, value) };
        Ok(if faulted == 0 {
            StoreOutcome::Stored
        } else {
            StoreOutcome::Sigbus
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = value;
        Err(Error::Invalid(
            "stray stores are implemented for x86-64 only".into(),
        ))
    }
}
