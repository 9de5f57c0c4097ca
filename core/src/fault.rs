//! Fault points: named steps of ADD, DEL and GC where the reliability tests make the process die
//! (as `kill -9` would) or the step fail, to prove that the next ADD, DEL or GC leaves nothing
//! behind. Inert unless the process was started with [`ENV`] naming a point, which only a
//! test does; the cost on the normal path is one environment lookup per step.
//!
//! `PODWIRE_FAULT=<point>:kill` kills the process with SIGKILL when it reaches `<point>`;
//! `PODWIRE_FAULT=<point>:error` makes that step fail with [`Injected`].

/// The environment variable naming the fault point and what happens there.
pub const ENV: &str = "PODWIRE_FAULT";

/// The error an `:error` fault point returns in place of its step's own.
#[derive(Debug, thiserror::Error)]
#[error("injected fault at {0} ({ENV})")]
pub struct Injected(pub &'static str);

/// Reaches the step named `name`: dies or fails there if [`ENV`] asks for it, else returns
/// `Ok` at once.
pub fn point(name: &'static str) -> Result<(), Injected> {
    let Ok(spec) = std::env::var(ENV) else {
        return Ok(());
    };
    match spec.rsplit_once(':') {
        Some((at, "kill")) if at == name => {
            // SAFETY: raise has no memory-safety preconditions; SIGKILL ends the process here,
            // running no destructors, as `kill -9` from outside would.
            unsafe { libc::raise(libc::SIGKILL) };
            unreachable!("SIGKILL is not caught")
        }
        Some((at, "error")) if at == name => Err(Injected(name)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_named_point_fails() {
        // Each test binary is its own process; this is the only test here touching ENV.
        std::env::set_var(ENV, "cni.add.after-allocate:error");
        assert!(point("cni.add.after-veth").is_ok());
        let err = point("cni.add.after-allocate").unwrap_err();
        assert_eq!(
            err.to_string(),
            "injected fault at cni.add.after-allocate (PODWIRE_FAULT)"
        );
        std::env::remove_var(ENV);
        assert!(point("cni.add.after-allocate").is_ok());
    }
}
