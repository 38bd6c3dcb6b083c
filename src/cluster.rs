//! Runs across processes and machines on timely's own cluster mode: the hostfile, a fingerprint
//! of what a run computes (checked by every worker at start-up, so processes started with
//! different pipelines refuse instead of mixing results), and a connection timeout that names
//! the hosts that could not be reached instead of waiting for ever.

use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::time::Duration;

use sha2::{Digest, Sha256};
use timely::dataflow::operators::vec::Broadcast;
use timely::dataflow::operators::{Input, Inspect, Probe};
use timely::dataflow::{InputHandle, ProbeHandle};

use crate::config::Plan;
use crate::error::{Error, Result};
use crate::source::ImageRef;

/// This process's place in a cluster.
#[derive(Debug, Clone)]
pub struct Cluster {
    /// Number of processes.
    pub processes: usize,
    /// This process's index, `0..processes`.
    pub process: usize,
    /// `host:port` of every process, in process order.
    pub hosts: Vec<String>,
    /// How long to wait for every process to connect.
    pub connect_timeout: Duration,
}

impl Cluster {
    /// Reads the hostfile (one `host:port` per line; blank lines and `#` comments ignored) and
    /// checks `process < processes <= hosts`.
    pub fn new(
        processes: usize,
        process: usize,
        hostfile: &Path,
        timeout: Duration,
    ) -> Result<Self> {
        let fail = |msg: String| Error::Config {
            file: hostfile.to_path_buf(),
            problems: vec![msg],
        };
        let text = std::fs::read_to_string(hostfile).map_err(|e| Error::io(hostfile, e))?;
        let hosts: Vec<String> = text
            .lines()
            .map(|l| l.split('#').next().unwrap_or("").trim().to_string())
            .filter(|l| !l.is_empty())
            .collect();
        if processes < 1 {
            return Err(fail("--processes must be at least 1".into()));
        }
        if process >= processes {
            return Err(fail(format!(
                "--process {process} is out of range: with --processes {processes} use 0 to {}",
                processes - 1
            )));
        }
        if hosts.len() < processes {
            return Err(fail(format!(
                "the hostfile lists {} host(s) for --processes {processes}: give one host:port line per process",
                hosts.len()
            )));
        }
        for (i, h) in hosts.iter().take(processes).enumerate() {
            if h.to_socket_addrs().is_err() {
                return Err(fail(format!(
                    "line for process {i}: `{h}` is not a reachable host:port address"
                )));
            }
        }
        Ok(Cluster {
            processes,
            process,
            hosts: hosts.into_iter().take(processes).collect(),
            connect_timeout: timeout,
        })
    }

    /// After a connection timeout: which other processes do not answer, as a sentence.
    pub fn unreachable(&self) -> String {
        let mut down = Vec::new();
        for (i, h) in self.hosts.iter().enumerate() {
            if i == self.process {
                continue;
            }
            let ok = h
                .to_socket_addrs()
                .ok()
                .and_then(|mut a| a.next())
                .is_some_and(|a| TcpStream::connect_timeout(&a, Duration::from_secs(1)).is_ok());
            if !ok {
                down.push(format!("process {i} at {h}"));
            }
        }
        if down.is_empty() {
            "every host accepts connections, but not every process joined: check that each was started with its own --process index".into()
        } else {
            format!(
                "no answer from {}: is freqtag running there with the same hostfile?",
                down.join(", ")
            )
        }
    }
}

/// A fingerprint of what a run computes: every setting but file locations, the tap list, terms,
/// and the image listing (ids and labels), which all processes must agree on to shard correctly.
pub fn fingerprint(plan: &Plan, images: &[ImageRef]) -> String {
    let mut p = plan.pipeline.clone();
    p.source.path = Default::default();
    p.model.weights = String::new();
    p.stimulus.mask = None;
    // processes may run on different devices (a GPU machine beside CPU ones)
    p.model.device = String::new();
    p.model.device_batch = 0;
    let mut h = Sha256::new();
    h.update(serde_json::to_string(&p).unwrap_or_default().as_bytes());
    h.update(plan.arch.name().as_bytes());
    for t in &plan.taps {
        h.update(t.as_bytes());
    }
    for r in images {
        h.update(r.id.as_bytes());
        h.update(r.label.unwrap_or(-1).to_le_bytes());
    }
    format!("{:x}", h.finalize())[..16].to_string()
}

/// Every worker announces `mine` to every other; an error names the processes that disagree.
pub fn check_fingerprints(
    worker: &mut timely::worker::Worker,
    mine: &str,
) -> std::result::Result<(), String> {
    let index = worker.index();
    let seen = std::rc::Rc::new(std::cell::RefCell::new(Vec::<(usize, String)>::new()));
    let mut input: InputHandle<u64, _> = InputHandle::new();
    let probe = ProbeHandle::new();
    let s = seen.clone();
    worker.dataflow::<u64, _, _>(|scope| {
        scope
            .input_from(&mut input)
            .container::<Vec<(usize, String)>>()
            .broadcast()
            .inspect(move |x| s.borrow_mut().push(x.clone()))
            .probe_with(&probe);
    });
    input.send((index, mine.to_string()));
    input.advance_to(1);
    worker.step_while(|| probe.less_than(&1));
    drop(input);
    let seen = seen.borrow();
    let differ: Vec<usize> = seen
        .iter()
        .filter(|(_, f)| f != mine)
        .map(|(w, _)| *w)
        .collect();
    if differ.is_empty() {
        return Ok(());
    }
    Err(format!(
        "workers {differ:?} run a different pipeline or see different images (fingerprint differs from this worker's {mine}): start every process with the same pipeline file, --set flags and image folder contents"
    ))
}
