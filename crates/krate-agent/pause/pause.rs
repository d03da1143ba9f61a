//! The sandbox process of every krate pod: it holds the pod's namespaces, reaps the
//! orphans re-parented to it (it is PID 1 of a shared PID namespace) and exits at once on
//! SIGINT/SIGTERM. Built static by build.rs; std is linked but not used, so the binary
//! depends on nothing in the image.
#![no_main]

use std::ffi::c_int;

const SIGINT: c_int = 2;
const SIGTERM: c_int = 15;
const SIGCHLD: c_int = 17;
const WNOHANG: c_int = 1;

extern "C" {
    fn signal(sig: c_int, handler: extern "C" fn(c_int)) -> usize;
    fn pause() -> c_int;
    fn waitpid(pid: c_int, status: *mut c_int, options: c_int) -> c_int;
    fn _exit(code: c_int) -> !;
}

extern "C" fn on_term(_: c_int) {
    unsafe { _exit(0) }
}

extern "C" fn on_child(_: c_int) {
    unsafe { while waitpid(-1, std::ptr::null_mut(), WNOHANG) > 0 {} }
}

#[no_mangle]
pub extern "C" fn main() -> c_int {
    unsafe {
        signal(SIGINT, on_term);
        signal(SIGTERM, on_term);
        signal(SIGCHLD, on_child);
        loop {
            pause();
        }
    }
}
