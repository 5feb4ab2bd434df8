//! A terminal's operation on a VM of this host: the VM task performs it through the
//! compute driver, between its other steps and in the order operations came, and
//! answers the server (`PUT /v1/terminal-operations/{terminal}/{seq}/result`).

use base64::Engine;
use compute::OpOutcome;
use model::terminals::{OperationOutcome, OperationResult, PerformedOperation, ScreenshotPng};

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
        // The answer goes on its own: the next operation is performed while this one's
        // record is written (the server's store commits concurrent answers together).
        let host = self.host.clone();
        tokio::spawn(async move { answer(&host, &op, result).await });
    }
}

/// Answers operation `op` with `result`. The server replies to the terminal as soon as it
/// has the answer and commits it after, so an answer whose request failed — the server
/// went away, or its store did not answer — may have reached the terminal and not the
/// log: it is sent again (the server takes a repeated answer as the same one), with
/// backoff, for [`ANSWER_RETRY_FOR`]. An answer the server refuses (4xx) is logged (the
/// record stays `sent`, which the terminal sees).
pub(crate) async fn answer(host: &Host, op: &PerformedOperation, result: OperationResult) {
    let until = std::time::Instant::now() + ANSWER_RETRY_FOR;
    let mut backoff = crate::push::Backoff::default();
    loop {
        let e = match host
            .client
            .answer_terminal_operation(op.terminal, op.seq, &result)
            .await
        {
            Ok(_) => return,
            Err(e) => e,
        };
        let again = match &e {
            client::ClientError::Transport { .. } => true,
            client::ClientError::Api { status, .. } => *status >= 500,
            _ => false,
        };
        if !again || std::time::Instant::now() >= until {
            tracing::warn!(terminal = %op.terminal, seq = op.seq, error = %model::error_chain(&e), "cannot answer a terminal operation");
            return;
        }
        tracing::debug!(terminal = %op.terminal, seq = op.seq, error = %model::error_chain(&e), "answering a terminal operation again");
        tokio::time::sleep(backoff.next_wait()).await;
    }
}

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
