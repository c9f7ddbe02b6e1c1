//! SIGINT / SIGTERM / SIGHUP handlers for the duration of a download.
//!
//! The handler only sets a flag, which the copy loops poll. It is installed without `SA_RESTART`,
//! so a blocking read on the thread that takes the signal returns `EINTR` and the loop sees the
//! flag at once. Downloads running at the same time share one installation (counted); the last one
//! to finish restores the handlers found by the first. A signal that was ignored when the first
//! download started (a `nohup` or background job) stays ignored.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};

const SIGNALS: [Signal; 3] = [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP];

static CAUGHT: AtomicBool = AtomicBool::new(false);

/// Handlers in force before the first live [`Guard`], and how many guards are live.
static INSTALLED: Mutex<Installed> = Mutex::new(Installed {
    holders: 0,
    previous: Vec::new(),
});

struct Installed {
    holders: usize,
    previous: Vec<(Signal, SigAction)>,
}

extern "C" fn on_signal(_signal: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    CAUGHT.store(true, Ordering::SeqCst);
}

/// Whether a stop signal arrived since the handlers were installed.
pub(super) fn caught() -> bool {
    CAUGHT.load(Ordering::SeqCst)
}

/// Keeps the handlers installed; dropping the last one restores the previous handlers.
#[derive(Debug)]
pub(super) struct Guard(());

pub(super) fn install() -> Result<Guard, nix::Error> {
    let mut installed = INSTALLED.lock().unwrap_or_else(PoisonError::into_inner);
    if installed.holders == 0 {
        CAUGHT.store(false, Ordering::SeqCst);
        let ours = SigAction::new(
            SigHandler::Handler(on_signal),
            SaFlags::empty(),
            SigSet::empty(),
        );
        let mut previous = Vec::with_capacity(SIGNALS.len());
        for signal in SIGNALS {
            match set(signal, &ours) {
                Ok(old) => {
                    if old.handler() == SigHandler::SigIgn {
                        // Put the ignore back; ignoring cannot fail where installing worked.
                        let _ = set(signal, &old);
                    }
                    previous.push((signal, old));
                }
                Err(e) => {
                    restore(&previous);
                    return Err(e);
                }
            }
        }
        installed.previous = previous;
    }
    installed.holders = installed.holders.saturating_add(1);
    Ok(Guard(()))
}

impl Drop for Guard {
    fn drop(&mut self) {
        let mut installed = INSTALLED.lock().unwrap_or_else(PoisonError::into_inner);
        installed.holders = installed.holders.saturating_sub(1);
        if installed.holders == 0 {
            let previous = std::mem::take(&mut installed.previous);
            restore(&previous);
        }
    }
}

fn restore(previous: &[(Signal, SigAction)]) {
    for (signal, action) in previous {
        if let Err(e) = set(*signal, action) {
            tracing::warn!(?signal, error = %e, "cannot restore the signal handler");
        }
    }
}

fn set(signal: Signal, action: &SigAction) -> Result<SigAction, nix::Error> {
    // SAFETY: the actions installed are either `on_signal`, which only stores to an atomic (an
    // async-signal-safe operation), or a disposition that `sigaction` itself returned earlier.
    unsafe { sigaction(signal, action) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn current(signal: Signal) -> SigHandler {
        let probe = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
        let old = set(signal, &probe).unwrap();
        set(signal, &old).unwrap();
        old.handler()
    }

    // One test so that nothing else in this binary changes SIGHUP's disposition meanwhile.
    #[test]
    fn guard_installs_handler_keeps_ignored_signal_ignored_and_restores_on_last_drop() {
        let ignore = SigAction::new(SigHandler::SigIgn, SaFlags::empty(), SigSet::empty());
        let before_hup = set(Signal::SIGHUP, &ignore).unwrap();
        let before_term = current(Signal::SIGTERM);

        let first = install().unwrap();
        let second = install().unwrap();
        let during_term = current(Signal::SIGTERM);
        let during_hup = current(Signal::SIGHUP);
        drop(first);
        let after_first_drop = current(Signal::SIGTERM);
        drop(second);
        let after_term = current(Signal::SIGTERM);
        let after_hup = current(Signal::SIGHUP);
        set(Signal::SIGHUP, &before_hup).unwrap();

        assert_eq!(during_term, SigHandler::Handler(on_signal));
        assert_eq!(during_hup, SigHandler::SigIgn);
        assert_eq!(after_first_drop, SigHandler::Handler(on_signal));
        assert_eq!(after_term, before_term);
        assert_eq!(after_hup, SigHandler::SigIgn);
    }
}
