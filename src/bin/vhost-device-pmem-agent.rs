// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! vhost-device-pmem-agent: runs in the guest, reads the daemon's bad ranges from a
//! virtio-serial port and records them in the guest's `/sys/block/pmemN/badblocks`,
//! so a read of a bad range fails cleanly (EIO, or SIGBUS on a DAX load) instead of
//! returning bad data. Built statically so it drops into any guest.
//!
//! It finds its device among the guest's pmem disks by region size, and by PCI
//! address when the daemon was given one (`--guest-pci-address`); several candidates
//! without a PCI address is an error, never a guess.

use std::{
    fs::{self, File, OpenOptions},
    io::Write,
    path::{Path, PathBuf},
    thread,
    time::Duration,
};

use vhost_device_pmem::{
    jsonl::{self, LineReader},
    media::channel::{
        guest_sectors, is_pci_address, parse_sysfs_number, FromAgent, ToAgent, DEFAULT_PORT_NAME,
    },
    media::ranges::SECTOR,
    media::sources::parse_badblocks,
};

struct Device {
    name: String,
    badblocks: PathBuf,
    data_offset: u64,
    /// Size of the block device in bytes.
    size: u64,
    /// Guest-physical address of its region.
    region_address: Option<u64>,
}

fn read_trim(p: &Path) -> Option<String> {
    fs::read_to_string(p).ok().map(|s| s.trim().to_string())
}

fn read_num(p: &Path) -> Option<u64> {
    parse_sysfs_number(&read_trim(p)?)
}

/// Every pmem disk whose region is `size` bytes, with its PCI address.
fn candidates(size: u64) -> Vec<(Device, Option<String>)> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir("/sys/block") else {
        return out;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("pmem") {
            continue;
        }
        let Ok(dev) = fs::canonicalize(e.path().join("device")) else {
            continue;
        };
        let Some(region) = dev.parent() else { continue };
        if !region
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("region"))
        {
            continue;
        }
        if read_num(&region.join("size")) != Some(size) {
            continue;
        }
        let data_offset = match (
            read_num(&dev.join("resource")),
            read_num(&region.join("resource")),
        ) {
            (Some(d), Some(r)) if d >= r => d - r,
            _ => 0,
        };
        let pci = dev
            .components()
            .filter_map(|c| c.as_os_str().to_str())
            .rfind(|c| is_pci_address(c))
            .map(str::to_string);
        let disk_size = read_num(&e.path().join("size")).unwrap_or(0) * SECTOR;
        out.push((
            Device {
                badblocks: e.path().join("badblocks"),
                name,
                data_offset,
                size: disk_size,
                region_address: read_num(&region.join("resource")),
            },
            pci,
        ));
    }
    out
}

fn find(size: u64, pci: Option<&str>, address: Option<u64>) -> Result<Device, String> {
    let mut c = candidates(size);
    if let Some(want) = pci {
        c.retain(|(_, p)| p.as_deref() == Some(want));
    }
    if let Some(want) = address {
        c.retain(|(d, _)| d.region_address == Some(want));
    }
    match c.len() {
        1 => Ok(c.pop().unwrap().0),
        0 => Err(format!(
            "no pmem disk with a {size}-byte region{}{}",
            pci.map(|p| format!(" at PCI {p}")).unwrap_or_default(),
            address
                .map(|a| format!(" at guest-physical address {a:#x}"))
                .unwrap_or_default()
        )),
        n => Err(format!(
            "{n} pmem disks have a {size}-byte region ({}); give the daemon --guest-pci-address",
            c.iter()
                .map(|(d, p)| format!("{} at {}", d.name, p.as_deref().unwrap_or("?")))
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// Records `sectors` in the disk's badblocks (entries already there are kept; the
/// kernel merges) and returns what the attribute lists afterwards.
fn apply(dev: &Device, sectors: &[(u64, u64)]) -> Result<Vec<(u64, u64)>, String> {
    for &(s, n) in sectors {
        // The kernel takes one "SECTOR COUNT" per write; counts above 512 are split.
        let mut s = s;
        let mut n = n;
        while n > 0 {
            let chunk = n.min(512);
            let mut f = OpenOptions::new()
                .write(true)
                .open(&dev.badblocks)
                .map_err(|e| format!("{}: {e}", dev.badblocks.display()))?;
            // One write(2): sysfs parses each write on its own.
            f.write_all(format!("{s} {chunk}\n").as_bytes())
                .map_err(|e| format!("{}: writing {s} {chunk}: {e}", dev.badblocks.display()))?;
            s += chunk;
            n -= chunk;
        }
    }
    Ok(parse_badblocks(
        &read_trim(&dev.badblocks).unwrap_or_default(),
    ))
}

fn send(port: &mut File, msg: &FromAgent) {
    let _ = jsonl::write_message(port, msg);
    eprintln!("vhost-device-pmem-agent: {msg:?}");
}

/// The device node of the virtio-serial port called `name`: udev's
/// /dev/virtio-ports/NAME link where there is one, otherwise the /dev/vportNpM whose
/// sysfs `name` matches (guests without udev, e.g. busybox mdev).
fn port_node(name: &str) -> Option<PathBuf> {
    let link = Path::new("/dev/virtio-ports").join(name);
    if link.exists() {
        return Some(link);
    }
    fs::read_dir("/sys/class/virtio-ports")
        .ok()?
        .flatten()
        .find(|e| read_trim(&e.path().join("name")).as_deref() == Some(name))
        .map(|e| Path::new("/dev").join(e.file_name()))
}

fn usage() -> ! {
    eprintln!("usage: vhost-device-pmem-agent [--port NAME | --port-path PATH]");
    std::process::exit(2)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut port_name = DEFAULT_PORT_NAME.to_string();
    let mut port_path: Option<PathBuf> = None;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--port" => port_name = args.next().unwrap_or_else(|| usage()),
            "--port-path" => {
                port_path = Some(PathBuf::from(args.next().unwrap_or_else(|| usage())))
            }
            "--version" => {
                println!("vhost-device-pmem-agent {}", env!("CARGO_PKG_VERSION"));
                return;
            }
            _ => usage(),
        }
    }
    let port = loop {
        let Some(path) = port_path.clone().or_else(|| port_node(&port_name)) else {
            eprintln!("vhost-device-pmem-agent: waiting for virtio-serial port {port_name}");
            thread::sleep(Duration::from_secs(1));
            continue;
        };
        match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(f) => break f,
            Err(e) => {
                eprintln!(
                    "vhost-device-pmem-agent: waiting for {}: {e}",
                    path.display()
                );
                thread::sleep(Duration::from_secs(1));
            }
        }
    };
    let mut out = port.try_clone().expect("dup port");
    let mut reader = LineReader::new(port, jsonl::MAX_ANSWER_LINE);
    let mut device: Option<Device> = None;
    // What the hello asked for: the device is looked up again before each list of
    // bad ranges, since its namespace may have changed since (a raw namespace made
    // fsdax moves the data behind a metadata area).
    let mut wanted: Option<(u64, Option<String>, Option<u64>)> = None;
    loop {
        let msg: ToAgent = match jsonl::read_message(&mut reader) {
            // The host side is not connected (daemon restarting): wait for it.
            Ok(None) => {
                thread::sleep(Duration::from_millis(100));
                continue;
            }
            Ok(Some(Ok(m))) => m,
            Ok(Some(Err(e))) => {
                send(
                    &mut out,
                    &FromAgent::Error {
                        message: format!("bad message: {e}"),
                    },
                );
                continue;
            }
            Err(e) => {
                eprintln!("vhost-device-pmem-agent: read: {e}");
                thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        match msg {
            ToAgent::Hello {
                size,
                pci_address,
                guest_address,
                ..
            } => {
                // The block device may still be probing: retry for a while.
                let mut found = Err(String::new());
                for _ in 0..50 {
                    found = find(size, pci_address.as_deref(), guest_address);
                    if found.is_ok() {
                        break;
                    }
                    thread::sleep(Duration::from_millis(200));
                }
                wanted = Some((size, pci_address, guest_address));
                match found {
                    Ok(d) => {
                        send(
                            &mut out,
                            &FromAgent::Attached {
                                device: format!("/dev/{}", d.name),
                                data_offset: d.data_offset,
                            },
                        );
                        device = Some(d);
                    }
                    Err(message) => {
                        device = None;
                        send(&mut out, &FromAgent::Error { message });
                    }
                }
            }
            ToAgent::Badblocks { ranges } => {
                if let Some((size, pci, address)) = &wanted {
                    if let Ok(now) = find(*size, pci.as_deref(), *address) {
                        let moved = device
                            .as_ref()
                            .is_none_or(|d| d.name != now.name || d.data_offset != now.data_offset);
                        if moved {
                            send(
                                &mut out,
                                &FromAgent::Attached {
                                    device: format!("/dev/{}", now.name),
                                    data_offset: now.data_offset,
                                },
                            );
                        }
                        device = Some(now);
                    }
                }
                let Some(dev) = &device else {
                    send(
                        &mut out,
                        &FromAgent::Error {
                            message: "bad ranges received, but no device attached".into(),
                        },
                    );
                    continue;
                };
                let (sectors, lost) = guest_sectors(dev.data_offset, dev.size, &ranges);
                if !lost.is_empty() {
                    send(&mut out, &FromAgent::Error {
                        message: format!("{} bad range(s) lie outside /dev/{}'s data area (fsdax metadata?): {lost:?}", lost.len(), dev.name),
                    });
                }
                match apply(dev, &sectors) {
                    Ok(listed) => send(&mut out, &FromAgent::Applied { sectors: listed }),
                    Err(message) => send(&mut out, &FromAgent::Error { message }),
                }
            }
        }
    }
}
