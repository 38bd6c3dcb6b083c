//! Cluster runs on timely's cluster mode, two processes on 127.0.0.1 started by the test.

use std::process::{Child, Command, Output, Stdio};

use crate::common::{
    freqtag, freqtag_args, paper_args, paper_pipeline, resnet32, root, run_python, shared_data,
    show, tmp,
};

/// Two free loopback ports, written as a hostfile.
fn hostfile(dir: &std::path::Path) -> std::path::PathBuf {
    let ports: Vec<u16> = (0..2)
        .map(|_| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        })
        .collect();
    let p = dir.join("hosts");
    std::fs::write(
        &p,
        format!(
            "# two processes on this machine\n127.0.0.1:{}\n127.0.0.1:{}\n",
            ports[0], ports[1]
        ),
    )
    .unwrap();
    p
}

fn spawn(args: &[String]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_freqtag"))
        .args(args)
        .current_dir(root())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("freqtag starts")
}

fn args(
    out: &std::path::Path,
    hosts: &std::path::Path,
    process: usize,
    weights: &std::path::Path,
    extra: &[&str],
) -> Vec<String> {
    let (process, hosts) = (process.to_string(), hosts.display().to_string());
    let mut more = vec![
        "--processes",
        "2",
        "--process",
        &process,
        "--hostfile",
        &hosts,
        "--connect-timeout",
        "60",
        "--set",
        "source.limit=4",
    ];
    more.extend_from_slice(extra);
    paper_args(out, 2, weights, &more)
}

fn wait(c: Child) -> Output {
    c.wait_with_output().expect("freqtag ends")
}

#[test]
fn two_processes_of_two_workers_equal_one_process_of_one() {
    let Some(shared) = shared_data("cluster") else {
        return;
    };
    let w = resnet32(&shared);
    let dir = tmp();
    let hosts = hostfile(dir.path());
    let cl = dir.path().join("cluster");
    let p1 = spawn(&args(&cl, &hosts, 1, &w, &[]));
    let p0 = spawn(&args(&cl, &hosts, 0, &w, &[]));
    let (o0, o1) = (wait(p0), wait(p1));
    assert_eq!(o0.status.code(), Some(0), "{}", show(&o0));
    assert_eq!(o1.status.code(), Some(0), "{}", show(&o1));
    assert!(cl.join("process-0/scores").is_dir() && cl.join("process-1/scores").is_dir());
    let single = dir.path().join("single");
    let o = freqtag_args(&paper_args(&single, 1, &w, &["--set", "source.limit=4"]));
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    run_python(
        "python/compare_runs.py",
        &[&single.display().to_string(), &cl.display().to_string()],
    );
}

#[test]
fn processes_with_different_pipelines_refuse() {
    let Some(shared) = shared_data("cluster mismatch") else {
        return;
    };
    let w = resnet32(&shared);
    let dir = tmp();
    let hosts = hostfile(dir.path());
    let out = dir.path().join("out");
    let p1 = spawn(&args(&out, &hosts, 1, &w, &["--set", "stimulus.smin=0.1"]));
    let p0 = spawn(&args(&out, &hosts, 0, &w, &[]));
    for o in [wait(p0), wait(p1)] {
        assert_eq!(o.status.code(), Some(2), "{}", show(&o));
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("different pipeline"),
            "{}",
            show(&o)
        );
    }
    assert!(!out.join("process-0/scores").exists());
}

#[test]
fn an_unreachable_process_times_out_naming_the_host() {
    let Some(shared) = shared_data("cluster timeout") else {
        return;
    };
    let w = resnet32(&shared);
    let dir = tmp();
    let hosts = hostfile(dir.path());
    let port1 = std::fs::read_to_string(&hosts)
        .unwrap()
        .lines()
        .last()
        .unwrap()
        .to_string();
    let mut a = args(&dir.path().join("out"), &hosts, 0, &w, &[]);
    let i = a.iter().position(|s| s == "--connect-timeout").unwrap();
    a[i + 1] = "3".into();
    let o = wait(spawn(&a));
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("within 3 s") && err.contains(&format!("process 1 at {port1}")),
        "{err}"
    );
}

#[test]
fn a_process_index_out_of_range_is_a_usage_error() {
    let dir = tmp();
    let hosts = hostfile(dir.path());
    let o = freqtag(&[
        "run",
        &paper_pipeline(),
        "--processes",
        "2",
        "--process",
        "2",
        "--hostfile",
        &hosts.display().to_string(),
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--process 2 is out of range"),
        "{}",
        show(&o)
    );
}
