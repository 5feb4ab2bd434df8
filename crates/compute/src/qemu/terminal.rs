//! Terminal operations on a QEMU VM over its QMP connection: guest input with
//! `input-send-event`, power actions (`system_powerdown`, `system_reset`, `stop`, `cont`)
//! and screenshots with `screendump`.
//!
//! Input uses `input-send-event` with explicit down and up events, never `send-key`:
//! `send-key` queues the key-ups on a timer of QEMU's virtual clock (`hold-time`), which
//! runs at the guest's pace, so a key's release time is not ours to set.
//!
//! QEMU checks every event of one `input-send-event` before it delivers any, then delivers
//! them in order while holding its big lock, so a guest never runs between two events of
//! one command and a refused command delivers nothing (`ui/input.c`,
//! `qmp_input_send_event`). One command per operation would therefore be ideal; but the
//! PS/2 keyboard queues only [`ps2::QUEUE_BYTES`] bytes, and a guest cannot read any of
//! them until the command is over. So the events of an operation go out in as few
//! commands as fit that budget ([`plan_commands`]), never splitting a group (a typed
//! character with its Shift, a key combination) unless the group alone is too big.
//!
//! Between two commands the guest must read what the first queued, and QEMU's answer to
//! the first says nothing about that: a TCG guest on a loaded host may not run at all
//! before the next command arrives, and the keyboard drops what does not fit. The signal
//! that it read is the keyboard interrupt: the i8042 raises IRQ 1 once for every byte it
//! makes readable, and QEMU counts the rising edges per interrupt line (`x-query-irq`,
//! the monitor's `info irq`). [`KeyboardQueue`] keeps, per VM, a bound on the bytes still
//! queued (what was sent, less the edges seen since) and a command waits until it fits.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use model::terminal_ops::{InputButton, InputEvent, Operation, PowerAction};
use serde_json::{json, Value};

use super::ps2;
use crate::qmp::{QmpClient, QmpError};
use crate::{png, ComputeError, OpOutcome, Screenshot};

/// Id of the VM's display (std VGA): screenshots show it, and the absolute pointer is
/// bound to it.
pub(crate) const DISPLAY_ID: &str = "video0";

/// QEMU's error for input sent to a guest that does not run (paused, migrating).
const NOT_RUNNING: &str = "VM not running";

/// Largest screenshot read back, bytes: a 16 MiB VGA frame as an uncompressed PNG is about
/// 48 MiB; anything bigger is not a screenshot.
const MAX_SCREENSHOT: u64 = 64 << 20;

/// The display and input devices of every VM: a std VGA (text mode 720x400 for a console
/// guest; `screendump` needs a graphic console) and a virtio tablet bound to it for
/// absolute pointer positions. The PS/2 keyboard and mouse come with the machine.
pub(super) const DEVICE_ARGS: [&str; 4] = [
    "-device",
    "VGA,id=video0",
    "-device",
    "virtio-tablet-pci,id=tablet0,display=video0",
];

/// The keyboard-queue bytes an event may use (pointer events use none: they go to the
/// tablet's virtqueue).
fn cost(ev: &InputEvent) -> usize {
    match ev {
        InputEvent::Key { qcode, down } => ps2::max_bytes(*qcode, *down),
        InputEvent::Move { .. } | InputEvent::Button { .. } => 0,
    }
}

/// The fewest keyboard-queue bytes an event may use (see [`ps2::min_bytes`]).
fn min_cost(ev: &InputEvent) -> usize {
    match ev {
        InputEvent::Key { qcode, down } => ps2::min_bytes(*qcode, *down),
        InputEvent::Move { .. } | InputEvent::Button { .. } => 0,
    }
}

/// Keyboard bytes one command may queue: one less than the queue, because the byte the
/// controller shows the guest (the last edge seen) stays in the queue until it is read,
/// and a count of edges cannot tell whether it was.
pub(crate) const COMMAND_BYTES: usize = ps2::QUEUE_BYTES - 1;

/// Packs event groups into `input-send-event` commands of at most [`COMMAND_BYTES`]
/// keyboard bytes each, in order. A group is split only when it alone is over the budget.
pub(crate) fn plan_commands(groups: &[Vec<InputEvent>]) -> Vec<Vec<InputEvent>> {
    let mut out: Vec<Vec<InputEvent>> = Vec::new();
    let mut cur: Vec<InputEvent> = Vec::new();
    let mut used = 0;
    for g in groups {
        let need: usize = g.iter().map(cost).sum();
        if !cur.is_empty() && used + need > COMMAND_BYTES {
            out.push(std::mem::take(&mut cur));
            used = 0;
        }
        if need <= COMMAND_BYTES {
            cur.extend_from_slice(g);
            used += need;
            continue;
        }
        for ev in g {
            let c = cost(ev);
            if !cur.is_empty() && used + c > COMMAND_BYTES {
                out.push(std::mem::take(&mut cur));
                used = 0;
            }
            cur.push(*ev);
            used += c;
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn button_name(b: InputButton) -> &'static str {
    match b {
        InputButton::Left => "left",
        InputButton::Middle => "middle",
        InputButton::Right => "right",
        InputButton::WheelUp => "wheel-up",
        InputButton::WheelDown => "wheel-down",
    }
}

/// QEMU's `InputEvent` objects for one event (a move is one `abs` event per axis).
fn qmp_events(ev: &InputEvent, out: &mut Vec<Value>) {
    match ev {
        InputEvent::Key { qcode, down } => out.push(json!({
            "type": "key",
            "data": { "down": down, "key": { "type": "qcode", "data": qcode.as_str() } },
        })),
        InputEvent::Move { x, y } => {
            for (axis, v) in [("x", x), ("y", y)] {
                out.push(json!({ "type": "abs", "data": { "axis": axis, "value": v } }));
            }
        }
        InputEvent::Button { button, down } => out.push(json!({
            "type": "btn",
            "data": { "down": down, "button": button_name(*button) },
        })),
    }
}

/// The arguments of one `input-send-event`. Pointer events name the display, so that they
/// reach the tablet bound to it; key events name none and reach the PS/2 keyboard (a VM
/// started before the display existed still takes keys).
pub(crate) fn input_command(events: &[InputEvent]) -> Value {
    let mut list = Vec::with_capacity(events.len() + 1);
    for ev in events {
        qmp_events(ev, &mut list);
    }
    if events.iter().all(|e| matches!(e, InputEvent::Key { .. })) {
        json!({ "events": list })
    } else {
        json!({ "device": DISPLAY_ID, "events": list })
    }
}

fn qmp_err(id: &str, op: &Operation, err: QmpError) -> ComputeError {
    match &err {
        QmpError::Command { desc, .. } if desc == NOT_RUNNING => ComputeError::InvalidState {
            id: id.to_owned(),
            state: "not running (paused or migrating)".into(),
            op: op.kind(),
        },
        _ => ComputeError::Qmp {
            id: id.to_owned(),
            err,
        },
    }
}

/// Keys that `sent` leaves down, in the order they went down.
fn held(sent: &[InputEvent]) -> Vec<InputEvent> {
    let mut down: Vec<model::terminal_ops::QCode> = Vec::new();
    for ev in sent {
        if let InputEvent::Key { qcode, down: d } = ev {
            if *d {
                down.push(*qcode);
            } else if let Some(i) = down.iter().rposition(|q| q == qcode) {
                down.remove(i);
            }
        }
    }
    down.into_iter()
        .rev()
        .map(|qcode| InputEvent::Key { qcode, down: false })
        .collect()
}

/// How long a guest may leave its keyboard unread (no new interrupt edge) before a command
/// goes out anyway: it then keeps what fits, as a keyboard nobody reads does.
pub(crate) const STALL: Duration = Duration::from_secs(2);

/// How often the interrupt count is read while a command waits.
const POLL: Duration = Duration::from_millis(2);

/// What the driver knows of one VM's PS/2 keyboard queue, kept from one operation to the
/// next (two short operations in a row overflow it as surely as one long one).
#[derive(Debug, Default)]
pub(crate) struct KeyboardQueue {
    /// At most this many bytes sent are not yet readable by the guest (sent, counted with
    /// [`min_cost`], less the edges seen since), capped at the queue's size.
    pending: usize,
    /// The keyboard interrupt's edge count when last read.
    edges: Option<u64>,
    /// The guest read nothing for [`STALL`]: commands stop waiting for it until it does.
    stalled: bool,
    /// QEMU gave no edge count: commands go out without waiting (as before the signal).
    blind: bool,
}

impl KeyboardQueue {
    /// Reads the edge count and takes the new edges off `pending`. `Ok(true)` if the
    /// guest read something since the last look.
    async fn refresh(&mut self, qmp: &QmpClient, id: &str) -> Result<bool, QmpError> {
        let text = qmp.execute("x-query-irq", None).await?;
        let text = text
            .get("human-readable-text")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let Some(now) = keyboard_edges(text) else {
            tracing::warn!(vm = %id, "no keyboard interrupt count from QEMU: long texts may lose keys");
            self.blind = true;
            return Ok(false);
        };
        let seen = match self.edges {
            Some(before) => now.saturating_sub(before),
            // First look: nothing sent before it is known to be queued.
            None => 0,
        };
        self.edges = Some(now);
        let seen = usize::try_from(seen).unwrap_or(usize::MAX);
        self.pending = self.pending.saturating_sub(seen);
        Ok(seen > 0)
    }

    /// Waits until `need` more bytes fit the queue (see [`COMMAND_BYTES`] for the byte
    /// kept back), or the guest stalls.
    async fn make_room(&mut self, qmp: &QmpClient, id: &str, need: usize) -> Result<(), QmpError> {
        let fits = |pending: usize| pending + need < ps2::QUEUE_BYTES || pending == 0;
        if self.blind || need == 0 {
            return Ok(());
        }
        if self.edges.is_none() {
            self.refresh(qmp, id).await?;
        }
        if fits(self.pending) && !self.stalled {
            return Ok(());
        }
        let started = Instant::now();
        let mut progress = Instant::now();
        loop {
            if self.refresh(qmp, id).await? {
                progress = Instant::now();
                self.stalled = false;
            }
            if fits(self.pending) || self.blind || self.stalled {
                break;
            }
            if progress.elapsed() >= STALL {
                tracing::warn!(
                    vm = %id,
                    queued = self.pending,
                    "the guest does not read its keyboard: sending anyway, it keeps what fits"
                );
                self.stalled = true;
                break;
            }
            tokio::time::sleep(POLL).await;
        }
        tracing::trace!(vm = %id, waited_us = started.elapsed().as_micros() as u64, "keyboard room");
        Ok(())
    }

    fn sent(&mut self, cmd: &[InputEvent]) {
        let bytes: usize = cmd.iter().map(min_cost).sum();
        self.pending = (self.pending + bytes).min(ps2::QUEUE_BYTES);
    }
}

/// The keyboard interrupt's (IRQ 1) edge count in `x-query-irq`'s text: the I/O APIC's
/// section if there is one, else the first that counts it. A line is listed once it
/// fired; a section without it counts 0.
pub(crate) fn keyboard_edges(text: &str) -> Option<u64> {
    let mut sections: Vec<(&str, u64)> = Vec::new();
    for line in text.lines() {
        if let Some(name) = line.strip_prefix("IRQ statistics for ") {
            sections.push((name.trim_end_matches(':'), 0));
        } else if let (Some(last), Some((irq, n))) = (sections.last_mut(), line.split_once(':')) {
            if irq.trim() == "1" {
                last.1 = n.trim().parse().ok()?;
            }
        }
    }
    sections
        .iter()
        .find(|(name, _)| name.contains("ioapic"))
        .or_else(|| sections.first())
        .map(|(_, n)| *n)
}

/// Performs `op` on the QEMU behind `qmp` (the operation must be valid). `scratch` is a
/// directory QEMU can write (the run dir): screenshots pass through it.
pub(crate) async fn perform(
    qmp: &QmpClient,
    kbd: &mut KeyboardQueue,
    id: &str,
    scratch: &Path,
    op: &Operation,
) -> Result<OpOutcome, ComputeError> {
    match op {
        Operation::Power { action } => {
            let out = power(qmp, id, op, *action).await;
            if matches!(action, PowerAction::Reset) && out.is_ok() {
                // A reset empties the keyboard's queue.
                kbd.pending = 0;
            }
            out
        }
        Operation::Screenshot => screenshot(qmp, id, scratch).await,
        _ => input(qmp, kbd, id, op).await,
    }
}

async fn input(
    qmp: &QmpClient,
    kbd: &mut KeyboardQueue,
    id: &str,
    op: &Operation,
) -> Result<OpOutcome, ComputeError> {
    let commands = plan_commands(&op.input_groups());
    let mut sent: Vec<InputEvent> = Vec::new();
    for (i, cmd) in commands.iter().enumerate() {
        let need: usize = cmd.iter().map(cost).sum();
        let sending = match kbd.make_room(qmp, id, need).await {
            Ok(()) => {
                qmp.execute("input-send-event", Some(input_command(cmd)))
                    .await
            }
            Err(e) => Err(e),
        };
        if let Err(err) = sending {
            // A later command of a split operation failed: do not leave its keys down.
            let release = held(&sent);
            if i > 0 && !release.is_empty() {
                let r = qmp
                    .execute("input-send-event", Some(input_command(&release)))
                    .await;
                tracing::warn!(
                    vm = %id,
                    op = op.kind(),
                    keys = release.len(),
                    released = r.is_ok(),
                    "operation failed halfway; released the keys it held"
                );
            }
            return Err(qmp_err(id, op, err));
        }
        kbd.sent(cmd);
        sent.extend_from_slice(cmd);
    }
    tracing::debug!(vm = %id, op = op.kind(), commands = commands.len(), events = sent.len(), "input sent");
    Ok(OpOutcome::Done)
}

async fn power(
    qmp: &QmpClient,
    id: &str,
    op: &Operation,
    action: PowerAction,
) -> Result<OpOutcome, ComputeError> {
    let command = match action {
        // The hypervisor runs (the driver checked): the VM is on.
        PowerAction::On => return Ok(OpOutcome::Done),
        PowerAction::Shutdown => "system_powerdown",
        PowerAction::Reset => "system_reset",
        PowerAction::Pause => "stop",
        PowerAction::Resume => "cont",
    };
    qmp.execute(command, None)
        .await
        .map_err(|err| qmp_err(id, op, err))?;
    tracing::info!(vm = %id, action = action.as_str(), "power action performed");
    Ok(OpOutcome::Done)
}

/// Tells concurrent screenshots' files apart.
static SCREENSHOTS: AtomicU64 = AtomicU64::new(0);

async fn screenshot(qmp: &QmpClient, id: &str, dir: &Path) -> Result<OpOutcome, ComputeError> {
    let n = SCREENSHOTS.fetch_add(1, Ordering::Relaxed);
    let path = dir.join(format!("screendump-{n}.png"));
    let filename = path.to_str().ok_or_else(|| ComputeError::InvalidSpec {
        id: id.to_owned(),
        reason: format!("run dir {} is not UTF-8", dir.display()),
    })?;
    // QEMU writes the file before it answers (the command waits for the display's update).
    let done = qmp
        .execute(
            "screendump",
            Some(json!({ "filename": filename, "format": "png" })),
        )
        .await;
    let read = match done {
        Ok(_) => read_screenshot(&path).await,
        Err(err) => Err(ComputeError::Qmp {
            id: id.to_owned(),
            err,
        }),
    };
    // Removed whatever happened: a failed screendump may still have left a file.
    match tokio::fs::remove_file(&path).await {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(vm = %id, path = %path.display(), error = %e, "cannot remove a screenshot")
        }
    }
    let png = read?;
    let (width, height) = png::dimensions(&png).map_err(|err| ComputeError::Screenshot {
        id: id.to_owned(),
        err,
    })?;
    tracing::debug!(vm = %id, width, height, bytes = png.len(), "screenshot taken");
    Ok(OpOutcome::Screenshot(Screenshot { png, width, height }))
}

async fn read_screenshot(path: &Path) -> Result<Vec<u8>, ComputeError> {
    let io = |err| ComputeError::Io {
        action: "read screenshot",
        path: path.to_owned(),
        err,
    };
    let len = tokio::fs::metadata(path).await.map_err(io)?.len();
    if len > MAX_SCREENSHOT {
        return Err(io(std::io::Error::other(format!(
            "{len} bytes, more than {MAX_SCREENSHOT}"
        ))));
    }
    tokio::fs::read(path).await.map_err(io)
}

#[cfg(test)]
mod tests {
    use model::terminal_ops::QCode;

    use super::*;

    fn op(json: &str) -> Operation {
        serde_json::from_str(json).unwrap()
    }

    fn bytes(cmd: &[InputEvent]) -> usize {
        cmd.iter().map(cost).sum()
    }

    #[test]
    fn small_operations_are_one_command() {
        for json in [
            r#"{"op":"key","qcode":"a","down":true}"#,
            r#"{"op":"type_text","text":"Hi\n"}"#,
            r#"{"op":"key_combo","qcodes":["ctrl","alt","delete"]}"#,
            r#"{"op":"key_combo","qcodes":["ctrl_r","alt_r","delete"]}"#,
            r#"{"op":"pointer_move","x":1,"y":2}"#,
            r#"{"op":"wheel","delta":-10}"#,
        ] {
            let o = op(json);
            let cmds = plan_commands(&o.input_groups());
            assert_eq!(cmds.len(), 1, "{json}: {cmds:?}");
            assert_eq!(cmds[0], o.input_events());
        }
    }

    #[test]
    fn long_text_is_split_between_characters_within_the_queue() {
        let text: String = "Hello, World! ".repeat(18);
        let o = Operation::TypeText { text };
        let cmds = plan_commands(&o.input_groups());
        assert!(cmds.len() > 1);
        let flat: Vec<InputEvent> = cmds.iter().flatten().copied().collect();
        assert_eq!(flat, o.input_events(), "order and content kept");
        let shift = QCode::from_name("shift").unwrap();
        for c in &cmds {
            assert!(bytes(c) <= COMMAND_BYTES, "{}", bytes(c));
            // No command ends with Shift held: characters are never split.
            assert!(held(c).is_empty(), "{c:?}");
            assert_ne!(
                c.last(),
                Some(&InputEvent::Key {
                    qcode: shift,
                    down: true
                })
            );
        }
    }

    #[test]
    fn an_oversized_combination_is_split_and_nothing_is_lost() {
        // 5 extended keys: 10 bytes down, 15 up.
        let o = op(r#"{"op":"key_combo","qcodes":["ctrl_r","alt_r","meta_r","insert","delete"]}"#);
        let cmds = plan_commands(&o.input_groups());
        assert_eq!(cmds.len(), 2);
        for c in &cmds {
            assert!(bytes(c) <= COMMAND_BYTES);
        }
        assert_eq!(
            cmds.iter().flatten().copied().collect::<Vec<_>>(),
            o.input_events()
        );
        // The first command takes all downs (10 bytes) and one up (3; a second would make
        // 16, over the 15 a command may use): after it, these keys are down, which a
        // failure of the second would release, last pressed first.
        let rel: Vec<String> = held(&cmds[0]).iter().map(ToString::to_string).collect();
        assert_eq!(
            rel,
            [
                "key insert up",
                "key meta_r up",
                "key alt_r up",
                "key ctrl_r up"
            ]
        );
    }

    #[test]
    fn keyboard_edges_come_from_the_io_apic() {
        let text = "IRQ statistics for isa-i8259:\n 0: 24\n 1: 11\nIRQ statistics for ioapic:\n 0: 24\n 1: 12\n 12: 3\n";
        assert_eq!(keyboard_edges(text), Some(12));
        // Not fired yet: not listed, 0.
        assert_eq!(
            keyboard_edges("IRQ statistics for ioapic:\n 0: 24\n"),
            Some(0)
        );
        assert_eq!(
            keyboard_edges("IRQ statistics for isa-i8259:\n 1: 5\n"),
            Some(5)
        );
        assert_eq!(keyboard_edges("no statistics"), None);
        assert_eq!(
            keyboard_edges("IRQ statistics for ioapic:\n 1: many\n"),
            None
        );
    }

    #[test]
    fn qmp_arguments_have_qemus_shape() {
        let v = input_command(&op(r#"{"op":"key","qcode":"ret","down":false}"#).input_events());
        assert_eq!(
            v,
            json!({"events": [{"type": "key", "data": {"down": false, "key": {"type": "qcode", "data": "ret"}}}]})
        );
        let v = input_command(&op(r#"{"op":"pointer_move","x":100,"y":32767}"#).input_events());
        assert_eq!(
            v,
            json!({"device": "video0", "events": [
                {"type": "abs", "data": {"axis": "x", "value": 100}},
                {"type": "abs", "data": {"axis": "y", "value": 32767}}]})
        );
        let v = input_command(&op(r#"{"op":"wheel","delta":1}"#).input_events());
        assert_eq!(v["events"][0]["data"]["button"], "wheel-up");
        assert_eq!(v["events"][1]["data"]["down"], false);
        let v = input_command(
            &op(r#"{"op":"pointer_button","button":"right","down":true}"#).input_events(),
        );
        assert_eq!(
            v["events"][0],
            json!({"type": "btn", "data": {"down": true, "button": "right"}})
        );
    }
}
