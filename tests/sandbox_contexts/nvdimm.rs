// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The `nvdimm` cells of the matrix: a fake QMP monitor in this process, which also
//! maps the file (QEMU's memory-backend-file), so the export's QMP session,
//! SO_PEERCRED, mapping check, guard and QEMU-alive checks all run under the filter.
//!
//! Owns: the fake monitor and the mapping. Never needs QEMU.

use super::*;

const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 1, "major": 11}, "package": ""}, "capabilities": []}}"#;

/// The guest-physical address the fake monitor reports.
const NV_ADDR: u64 = 1 << 32;

/// Serves one QMP session on `listener`: an empty VM that accepts object-add and
/// device_add, and then lists the device.
fn fake_qmp(listener: UnixListener, size: u64) -> thread::JoinHandle<Vec<String>> {
    thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        let mut w = s.try_clone().unwrap();
        let r = BufReader::new(s);
        writeln!(w, "{GREETING}").unwrap();
        let mut plugged = false;
        let mut commands = Vec::new();
        for line in r.lines() {
            let Ok(line) = line else { break };
            let req: Value = serde_json::from_str(&line).unwrap();
            let cmd = req["execute"].as_str().unwrap_or_default().to_string();
            let ret = match cmd.as_str() {
                "query-memory-devices" if plugged => json!([{"type": "nvdimm", "data": {
                    "id": "nv0", "memdev": "/objects/mem-nv0", "addr": NV_ADDR,
                    "size": size, "slot": 0, "node": 0, "hotplugged": true,
                    "hotpluggable": true}}]),
                "query-memory-devices" => json!([]),
                "device_add" => {
                    plugged = true;
                    json!({})
                }
                _ => json!({}),
            };
            commands.push(cmd);
            writeln!(w, "{}", json!({"return": ret, "id": req["id"]})).unwrap();
        }
        commands
    })
}

/// A shared mapping of `file` in this process, as QEMU's backend holds it.
struct Mapped(*mut libc::c_void, usize);

impl Mapped {
    fn of(file: &Path, len: usize) -> Self {
        let f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(file)
            .unwrap();
        // SAFETY: a fresh shared read mapping of a file we opened; unmapped on drop.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        Self(p, len)
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: our own mapping.
        unsafe { libc::munmap(self.0, self.1) };
    }
}

/// One `nvdimm` cell (`--mode volatile`: the host has no DAX): the export plugs
/// the file into the fake monitor, verifies this process's mapping, guards it, serves
/// the agent its hello and saves an injected bad range; then the checks and a clean
/// SIGTERM.
fn nvdimm_cell(c: Cell) {
    let s = Scratch::new();
    let dir = s.dir.path().to_path_buf();
    let file = s.backing_file("nv.img", 2 * MIB2);
    for d in ["run", "state"] {
        fs::create_dir_all(dir.join(d)).unwrap();
    }
    let qmp_path = dir.join("run/qmp.sock");
    let monitor = fake_qmp(UnixListener::bind(&qmp_path).unwrap(), 2 * MIB2);
    let _mapped = Mapped::of(&file, (2 * MIB2) as usize);
    let rel = [
        ("file", "nv.img"),
        ("qmp-socket", "run/qmp.sock"),
        ("control-socket", "run/nv.ctl"),
        ("agent-socket", "run/nv.agent"),
        ("state-dir", "state"),
    ];
    let mut args = os(&[
        "nvdimm",
        "--id",
        "nv0",
        "--mode",
        "volatile",
        "--seccomp",
        "enforce",
    ]);
    for (k, v) in rel {
        args.push(format!("--{k}").into());
        args.push(match c.paths {
            Paths::Absolute => dir.join(v).into_os_string(),
            _ => v.into(),
        });
    }
    let mut run = Run::start(
        &args,
        &dir,
        c.stderr,
        &env_of(&c),
        dir.join("run/nv.ctl"),
        &s,
    )
    .unwrap_or_else(|e| panic!("{c:?}: {e}"));
    let st = run.wait_status("the mapping verified", |st| {
        st["nvdimm"]["mapping_verified"] == true
    });
    assert_eq!(st["nvdimm"]["qemu_pid"], std::process::id(), "{st:#}");
    assert_eq!(st["file"], file.display().to_string(), "{st:#}");
    assert_eq!(st["socket"], qmp_path.display().to_string(), "{st:#}");
    let (_agent, hello) = agent_hello(&dir.join("run/nv.agent"));
    assert_eq!(hello["guest_address"], NV_ADDR, "{hello}");
    inject_and_see_it_saved(&dir.join("run/nv.ctl"), &dir.join("state"));
    if c.panic {
        run.wait_status("the forced panic", |st| {
            !st["services_failed"].as_array().unwrap().is_empty()
        });
    }
    let st = run.status();
    assert_clean(&run, &st, c.panic);
    let log = assert_clean_exit(&mut run);
    check_log(&c, &log);
    let commands = monitor.join().unwrap();
    assert!(commands.iter().any(|x| x == "device_add"), "{commands:?}");
}

cells! { nvdimm_cell:
    nvdimm_stderr_pty => cell(Stderr::Pty, Paths::Absolute),
    nvdimm_stderr_pipe => cell(Stderr::Pipe, Paths::Absolute),
    nvdimm_stderr_file => cell(Stderr::File, Paths::Absolute),
    nvdimm_stderr_closed => cell(Stderr::Closed, Paths::Absolute),
    nvdimm_stderr_journal_stream => cell(Stderr::Journal, Paths::Absolute),
    nvdimm_relative_paths => cell(Stderr::File, Paths::RelativeFlags),
    nvdimm_rust_backtrace_and_a_panicking_service_on_a_pty =>
        Cell { panic: true, ..cell(Stderr::Pty, Paths::RelativeFlags) },
}
