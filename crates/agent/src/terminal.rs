//! A terminal's operation on a VM of this host: the VM task performs it through the
//! compute driver, between its other steps and in the order operations came, and
//! answers the server (`POST /v1/terminal-operations/results`, several answers at once
//! when the host is busy).

use std::sync::Arc;

use base64::Engine;
use compute::OpOutcome;
use model::terminals::{
    OperationAnswer, OperationAnswers, OperationOutcome, OperationResult, PerformedOperation,
    ScreenshotPng, MAX_ANSWERS,
};
use tokio::sync::mpsc;

use crate::vm::VmTask;
use crate::Host;

impl VmTask {
    /// Performs `op` on this task's VM and answers it.
    pub(crate) async fn terminal_operation(&mut self, op: PerformedOperation) {
        let result = match self
            .host
            .driver
            .perform(&self.files.driver_id(), &op.op)
            .await
        {
            Ok(OpOutcome::Screenshot(s)) => OperationResult {
                host: self.host.cfg.host_name.clone(),
                outcome: OperationOutcome::Performed,
                detail: Some(format!(
                    "{}x{} PNG, {} bytes",
                    s.width,
                    s.height,
                    s.png.len()
                )),
                screenshot: Some(ScreenshotPng {
                    width: s.width,
                    height: s.height,
                    png_base64: base64::engine::general_purpose::STANDARD.encode(&s.png),
                }),
            },
            Ok(_) => OperationResult {
                host: self.host.cfg.host_name.clone(),
                outcome: OperationOutcome::Performed,
                detail: None,
                screenshot: None,
            },
            Err(e) => OperationResult {
                host: self.host.cfg.host_name.clone(),
                outcome: OperationOutcome::Failed,
                detail: Some(model::error_chain(&e)),
                screenshot: None,
            },
        };
        // Queued: the next operation is performed while this one's answer is sent.
        answer(&self.host, &op, result).await;
    }
}

/// Answers operation `op` with `result`: queued for the host's [`answerer`].
pub(crate) async fn answer(host: &Host, op: &PerformedOperation, result: OperationResult) {
    let a = OperationAnswer {
        terminal: op.terminal,
        seq: op.seq,
        result,
    };
    if host.answers.send(a).await.is_err() {
        // Only while the agent shuts down.
        tracing::warn!(terminal = %op.terminal, seq = op.seq, "the answerer is gone: a terminal operation is not answered");
    }
}

/// The host's answers to the server: one request (`POST /v1/terminal-operations/results`)
/// carries what was performed while the previous ones were under way, so that a busy host
/// sends one request per batch instead of one per operation; up to [`ANSWERS_IN_FLIGHT`]
/// requests at once, so that a quiet host sends each answer at once. Ends when every
/// sender is gone.
///
/// The server replies to the terminal as soon as it has an answer and commits it after,
/// so an answer whose request failed — the server went away, or its store did not
/// answer — may have reached the terminal and not the log: it is sent again (the server
/// takes a repeated answer as the same one), with backoff, for [`ANSWER_RETRY_FOR`]. An
/// answer the server refuses (4xx) is logged (the record stays `sent`, which the terminal
/// sees).
pub(crate) async fn answerer(client: client::Client, mut rx: mpsc::Receiver<OperationAnswer>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(ANSWERS_IN_FLIGHT));
    while let Some(first) = rx.recv().await {
        // Waiting for a slot is when answers gather.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < MAX_ANSWERS {
            match rx.try_recv() {
                Ok(a) => batch.push(a),
                Err(_) => break,
            }
        }
        let client = client.clone();
        tokio::spawn(async move {
            send_answers(&client, batch).await;
            drop(slot);
        });
    }
}

/// Sends `batch` until every answer in it is recorded, refused, or out of time.
async fn send_answers(client: &client::Client, mut batch: Vec<OperationAnswer>) {
    let until = std::time::Instant::now() + ANSWER_RETRY_FOR;
    let mut backoff = crate::push::Backoff::default();
    loop {
        let why = match client
            .answer_terminal_operations(&OperationAnswers {
                answers: batch.clone(),
            })
            .await
        {
            Ok(outcomes) => {
                let mut again = Vec::new();
                // A status per answer, in order; an answer the reply has no status for
                // (a reply cut short) is sent again rather than dropped.
                let mut outcomes = outcomes.into_iter();
                for a in batch {
                    let Some(o) = outcomes.next() else {
                        again.push(a);
                        continue;
                    };
                    match o.status {
                        200 => {}
                        s if s >= 500 => again.push(a),
                        _ => {
                            tracing::warn!(terminal = %a.terminal, seq = a.seq, status = o.status, detail = o.detail.unwrap_or_default(), "the server refused the answer to a terminal operation")
                        }
                    }
                }
                if again.is_empty() {
                    return;
                }
                batch = again;
                "the server could not record it".to_owned()
            }
            Err(e) => {
                let transient = match &e {
                    client::ClientError::Transport { .. } => true,
                    client::ClientError::Api { status, .. } => *status >= 500,
                    _ => false,
                };
                if !transient {
                    tracing::warn!(answers = batch.len(), error = %model::error_chain(&e), "cannot answer terminal operations");
                    return;
                }
                model::error_chain(&e)
            }
        };
        if std::time::Instant::now() >= until {
            tracing::warn!(
                answers = batch.len(),
                error = why,
                "gave up answering terminal operations"
            );
            return;
        }
        tracing::debug!(
            answers = batch.len(),
            error = why,
            "answering terminal operations again"
        );
        tokio::time::sleep(backoff.next_wait()).await;
    }
}

/// How many answer requests a host has under way at once.
const ANSWERS_IN_FLIGHT: usize = 4;

/// How long an answer the server did not take is sent again: a server restart.
const ANSWER_RETRY_FOR: std::time::Duration = std::time::Duration::from_secs(120);

/// The answer for an operation this host cannot give to a VM task (no such VM here,
/// or its queue is full).
pub(crate) fn refused(host: &Host, why: &str) -> OperationResult {
    OperationResult {
        host: host.cfg.host_name.clone(),
        outcome: OperationOutcome::Failed,
        detail: Some(why.to_owned()),
        screenshot: None,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use model::terminals::{
        OperationAnswer, OperationOutcome, OperationResult, PerformedOperation,
    };
    use model::{Name, TerminalId, VmId};
    use store::Store;

    /// An answer the server could not take — it was down — is sent again until the
    /// server is back, and recorded then (a server that replied to the terminal and
    /// died before its commit loses nothing); then each answer of a batch gets its own
    /// status.
    #[tokio::test]
    async fn an_answer_is_sent_again_until_the_server_is_back_and_a_batch_has_statuses() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(store::testing::MemStore::new());
        let token = api::bootstrap_admin(store.as_ref(), dir.path())
            .await
            .unwrap()
            .unwrap();
        // What a server that died before its commit leaves: the record `sent`.
        let (terminal, seq) = (TerminalId::new_random(), 7);
        let key = format!("{}{terminal}/{seq:020}", control::terminals::TERMINAL_OPS);
        let sent = PerformedOperation {
            terminal,
            vm: VmId::new_random(),
            host: Name::try_from("host-a".to_owned()).unwrap(),
            seq,
            op: model::terminal_ops::Operation::Screenshot,
            received: control::now_ms(),
            performed: None,
            outcome: OperationOutcome::Sent,
            detail: None,
            screenshot: None,
        };
        store
            .put(&key, serde_json::to_vec(&sent).unwrap().into())
            .await
            .unwrap();
        // A loopback port with nobody listening yet.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let client = client::Client::new(&format!("http://{addr}"), &token).unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let answerer = tokio::spawn(super::answerer(client, rx));
        tx.send(OperationAnswer {
            terminal,
            seq,
            result: OperationResult {
                host: "host-a".into(),
                outcome: OperationOutcome::Performed,
                detail: Some("done".into()),
                screenshot: None,
            },
        })
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        let outcome = || async {
            let kv = store.get(&key).await.unwrap().unwrap();
            serde_json::from_slice::<PerformedOperation>(&kv.value)
                .unwrap()
                .outcome
        };
        assert_eq!(outcome().await, OperationOutcome::Sent, "no server yet");

        let server = api::serve(
            api::ServerConfig {
                listen: addr,
                ..api::ServerConfig::default()
            },
            store.clone(),
        )
        .await
        .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        while outcome().await != OperationOutcome::Performed {
            assert!(
                std::time::Instant::now() < deadline,
                "the answer was not sent again"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drop(tx);
        answerer.await.unwrap();

        // Each answer of a batch has its own status: recorded (again: the same answer),
        // another host's (409), no such operation (404); too many answers refuse the batch.
        let c = client::Client::new(&format!("http://{addr}"), &token).unwrap();
        let answer = |terminal, host: &str| OperationAnswer {
            terminal,
            seq,
            result: OperationResult {
                host: host.into(),
                outcome: OperationOutcome::Performed,
                detail: None,
                screenshot: None,
            },
        };
        let outcomes = c
            .answer_terminal_operations(&model::terminals::OperationAnswers {
                answers: vec![
                    answer(terminal, "host-a"),
                    answer(terminal, "host-b"),
                    answer(TerminalId::new_random(), "host-a"),
                ],
            })
            .await
            .unwrap();
        let statuses: Vec<_> = outcomes.iter().map(|o| o.status).collect();
        assert_eq!(statuses, [200, 409, 404], "{outcomes:?}");
        assert!(outcomes[1]
            .detail
            .as_deref()
            .unwrap_or_default()
            .contains("host-a"));
        let e = c
            .answer_terminal_operations(&model::terminals::OperationAnswers {
                answers: vec![answer(terminal, "host-a"); model::terminals::MAX_ANSWERS + 1],
            })
            .await
            .unwrap_err();
        assert!(
            matches!(e, client::ClientError::Api { status: 422, .. }),
            "{e:?}"
        );
        server.shutdown().await.unwrap();
    }
}
