//! Block-trace recording: the agent's NBD server records a VM disk's requests while the
//! VM's trace is on, and uploads the file after the stop; what comes back is the
//! guest's I/O in MSR Cambridge CSV.

use cache::trace::{detect_format, read_trace, Op, TraceFormat};
use compute::sim::guest;

use crate::harness::{self, Cluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_records_the_guests_disk_requests_and_comes_back_as_msr() {
    let c = Cluster::start().await;
    let d = Cluster::driver();
    let _a = c.agent("host-a", &d).await;
    let vm = c.create_vm("web", "host-a").await;
    let id = vm.id.to_string();
    c.wait_running(&vm).await;

    // Stopping what never started is refused with the reason.
    let e = c.admin.set_trace(&id, false).await.unwrap_err();
    assert!(e.to_string().contains("not recording"), "{e}");

    let v = c.admin.set_trace(&id, true).await.unwrap();
    assert!(v.trace.as_ref().is_some_and(|t| t.recording));
    let console = c.wait_ticks(&vm, 0, 1).await;
    let before = harness::good_ticks(&console);
    // The agent starts recording when the pushed change reaches it, a tick or so after
    // the answer: 8 ticks leave room for at least 6 recorded ones.
    c.wait_ticks(&vm, before, 8).await;
    c.admin.set_trace(&id, false).await.unwrap();
    let digest = {
        let deadline = tokio::time::Instant::now() + harness::WAIT;
        loop {
            let now = c.admin.get_vm(&id).await.unwrap();
            if let Some(d) = now.trace.and_then(|t| t.blob) {
                break d;
            }
            assert!(tokio::time::Instant::now() < deadline, "no trace uploaded");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    };
    let file = c.dir.path().join("web.csv");
    c.admin.download_blob(&digest, &file).await.unwrap();
    assert_eq!(detect_format(&file).unwrap(), TraceFormat::Msr);
    let reqs = read_trace(&file, TraceFormat::Msr).unwrap();
    // Each tick reads one block of the data area and writes and reads back the
    // sequence record: at least 6 ticks' worth, each request where the guest made it.
    let seq = guest::seq_offset(16);
    let writes: Vec<_> = reqs.iter().filter(|r| r.op == Op::Write).collect();
    assert!(writes.len() >= 6, "{} writes", writes.len());
    assert!(
        writes
            .iter()
            .all(|r| r.offset == seq && r.len as usize == guest::SEQ_RECORD_BYTES),
        "{writes:?}"
    );
    let data_reads = reqs
        .iter()
        .filter(|r| r.op == Op::Read && r.offset < seq)
        .count();
    assert!(data_reads >= 6, "{reqs:?}");
    assert!(reqs
        .windows(2)
        .all(|w| w[0].time_us <= w[1].time_us + 1_000));
    // The agent's copy is gone once uploaded.
    let run = harness::run_dir(&c.host_dir("host-a"), &vm);
    assert!(!run.join("trace.csv").exists());

    // A new start replaces the finished trace.
    let v = c.admin.set_trace(&id, true).await.unwrap();
    assert!(v.trace.is_some_and(|t| t.recording && t.blob.is_none()));
}
