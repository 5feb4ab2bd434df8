//! The WebSocket end of a terminal session (`GET /v1/terminal-sessions`): frames in,
//! one call to the control layer's session per message, replies out in the order the
//! messages came, pings to notice a client that vanished. What a session means (one
//! terminal, held keys released when it ends) is `control::sessions`'.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket};
use control::sessions::{SessionRefusal, TerminalSession};
use control::terminals::Pending;
use futures_util::stream::FuturesOrdered;
use futures_util::{FutureExt, StreamExt};
use model::terminals::{SessionReplies, SessionReply};

/// How often the server pings an idle session. There is no idle timeout: a session
/// that answers pings lives as long as its client wants.
pub(crate) const PING_EVERY: Duration = Duration::from_secs(5);
/// A session that sent nothing (not even a pong) for this long is over: its client or
/// the path to it is gone without a close (its held keys are then released).
pub(crate) const SILENT_FOR: Duration = Duration::from_secs(15);
/// How long a message's reply waits for the host's answer before it says `sent`.
const ANSWER_WAIT: Duration = Duration::from_secs(3);

type Reply = Pin<Box<dyn Future<Output = SessionReply> + Send>>;

/// Messages taken together into one batch at most.
const BATCH: usize = 64;

/// What a frame means to the session.
enum Frame {
    /// An operation message.
    Message(Vec<u8>),
    /// A ping or pong.
    Control,
    /// The session is over, and why.
    End(&'static str),
}

fn frame_bytes(frame: Option<Result<Message, axum::Error>>) -> Frame {
    match frame {
        Some(Ok(Message::Text(t))) => Frame::Message(t.as_str().as_bytes().to_vec()),
        Some(Ok(Message::Binary(b))) => Frame::Message(b.to_vec()),
        Some(Ok(Message::Ping(_) | Message::Pong(_))) => Frame::Control,
        Some(Ok(Message::Close(_))) | None => Frame::End("closed by the client"),
        Some(Err(_)) => Frame::End("connection lost"),
    }
}

/// The reply to one message, once its host answered.
fn reply(r: Result<Pending, SessionRefusal>, form: SessionReplies) -> Reply {
    match r {
        Ok(pending) => {
            Box::pin(async move { SessionReply::answer(pending.answer(ANSWER_WAIT).await, form) })
        }
        Err(r) => Box::pin(std::future::ready(SessionReply::Refused {
            seq: r.seq,
            reason: r.refused.reason().to_owned(),
            detail: r.refused.to_string(),
            previous: r.previous,
        })),
    }
}

/// Serves one session until its client closes it, drops, or stays silent; then ends
/// the session (which releases what it holds). Answers go in `form`.
pub(crate) async fn serve(
    mut socket: WebSocket,
    mut session: TerminalSession,
    form: SessionReplies,
) {
    let mut replies: FuturesOrdered<Reply> = FuturesOrdered::new();
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut heard = tokio::time::Instant::now();
    let why = loop {
        tokio::select! {
            frame = socket.recv() => {
                heard = tokio::time::Instant::now();
                let mut raws = Vec::new();
                let mut end = None;
                match frame_bytes(frame) {
                    Frame::Message(raw) => raws.push(raw),
                    Frame::Control => continue,
                    Frame::End(why) => break why,
                }
                // Messages already here go with it: one transaction records them all.
                while raws.len() < BATCH {
                    let Some(frame) = socket.recv().now_or_never() else {
                        break;
                    };
                    match frame_bytes(frame) {
                        Frame::Message(raw) => raws.push(raw),
                        Frame::Control => {}
                        Frame::End(why) => {
                            end = Some(why);
                            break;
                        }
                    }
                }
                let slices: Vec<&[u8]> = raws.iter().map(Vec::as_slice).collect();
                for r in session.submit_all(&slices).await {
                    replies.push_back(reply(r, form));
                }
                if let Some(why) = end {
                    // Send what was answered, then end.
                    while let Some(reply) = replies.next().await {
                        let text = serde_json::to_string(&reply).unwrap_or_default();
                        if socket.send(Message::Text(text.into())).await.is_err() {
                            break;
                        }
                    }
                    break why;
                }
            }
            Some(reply) = replies.next(), if !replies.is_empty() => {
                // Serializing a reply cannot fail (strings, numbers, enums).
                let text = serde_json::to_string(&reply).unwrap_or_default();
                if socket.send(Message::Text(text.into())).await.is_err() {
                    break "connection lost";
                }
            }
            _ = ping.tick() => {
                if heard.elapsed() > SILENT_FOR {
                    break "silent";
                }
                if socket.send(Message::Ping(Default::default())).await.is_err() {
                    break "connection lost";
                }
            }
        }
    };
    let terminal = session.terminal();
    let released = session.end().await;
    tracing::info!(?terminal, why, released, "terminal session ended");
}
