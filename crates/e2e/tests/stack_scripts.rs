//! The stack scripts' process helpers (`deploy/lib.sh`), run by bash against real processes.
//!
//! `cluster-fault.sh` and `stack-down.sh` kill a daemon, wait for it to exit, and start it
//! again on the same port; "exited" has to mean its files (the listening socket) are closed.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A process whose main thread exits while another thread keeps its listening socket open
/// for `HOLD_S` seconds: the main thread shows as a zombie (`Z` in `/proc/PID/stat`) the
/// whole time, as a killed redis-server's does while its other threads are still exiting.
const HOLDER: &str = r#"
import ctypes, socket, sys, threading, time
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen(8)
threading.Thread(target=time.sleep, args=(float(sys.argv[1]),)).start()
print(s.getsockname()[1], flush=True)
ctypes.CDLL(None).pthread_exit(None)
"#;
const HOLD_S: f64 = 2.0;

fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?.1.chars().next()
}

/// CI failed on this once: `cluster-fault.sh restart-redis-empty` killed a node, its
/// `wait_pid_exit` took the zombie main thread for an exited process, and the restart found
/// the node's port "in use by another process (unknown process)".
#[test]
fn wait_pid_exit_returns_only_once_the_processs_last_thread_is_gone() {
    let mut holder = Command::new("python3")
        .args(["-c", HOLDER, &HOLD_S.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    let pid = holder.id();
    let mut line = String::new();
    BufReader::new(holder.stdout.take().expect("piped stdout"))
        .read_line(&mut line)
        .expect("the holder prints its port");
    let port: u16 = line.trim().parse().expect("a port number");

    // The window under test: the main thread is a zombie, the socket still listens.
    let deadline = Instant::now() + Duration::from_secs(5);
    while proc_state(pid) != Some('Z') {
        assert!(
            Instant::now() < deadline,
            "the holder's main thread never exited"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let started = Instant::now();
    let out = Command::new("bash")
        .args([
            "-c",
            r#"set -euo pipefail; . deploy/lib.sh
               wait_pid_exit "$1" 20 || { echo timeout; exit 0; }
               if port_open "$2"; then echo open; else echo closed; fi"#,
            "test",
            &pid.to_string(),
            &port.to_string(),
        ])
        .current_dir(repo_root())
        .output()
        .expect("bash runs");
    let waited = started.elapsed();
    let status = holder.wait().expect("the holder is reaped");
    assert!(
        out.status.success(),
        "bash: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "closed",
        "after wait_pid_exit (returned after {waited:?}) the port of pid {pid} must be closed"
    );
    assert!(
        status.success(),
        "the holder exits 0 once its last thread ends: {status}"
    );
}
