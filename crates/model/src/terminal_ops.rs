//! Terminal operations: what a user did at a terminal (a key, a line of text, a click, a
//! power button, a screenshot request), in the form the hypervisor performs it on the VM
//! bound to that terminal.
//!
//! The API takes an [`Operation`] from a terminal's message body, the agent hands it to
//! its compute driver, and the driver turns it into guest input ([`Operation::input_groups`])
//! or a power or screenshot command. Keys are QEMU's key codes ([`QCODES`], the one list);
//! text is typed on a US layout ([`us_key`]).
//!
//! Deserializing validates: a decoded [`Operation`] always passes [`Operation::validate`],
//! and a refusal names the field (`qcodes[2]: unknown QEMU key code "ctl"`).
//!
//! ```
//! use model::terminal_ops::{InputEvent, Operation, QCode};
//! let op: Operation = serde_json::from_str(r#"{"op": "type_text", "text": "Hi"}"#)?;
//! let shift = QCode::from_name("shift").unwrap();
//! assert_eq!(op.input_events()[0], InputEvent::Key { qcode: shift, down: true });
//! let bad = serde_json::from_str::<Operation>(r#"{"op": "key", "qcode": "ctl", "down": true}"#);
//! assert!(bad.unwrap_err().to_string().starts_with("qcode: unknown QEMU key code"));
//! # Ok::<(), serde_json::Error>(())
//! ```

use std::borrow::Cow;
use std::fmt;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::ValidationError;

/// QEMU's key codes (`QKeyCode` in QEMU's `qapi/ui.json`), in QEMU's order: every name a
/// key operation may use. This is QEMU 10.0's list (`f13`..`f24` since 8.0, `lang1` and
/// `lang2` since 6.1); compute's tests compare it with the running QEMU's QMP schema.
/// Some codes reach no key on a PS/2 keyboard (`unmapped`, `menu`, `again` .. `help`,
/// `lang1`, `lang2`, `f16` .. `f24`): QEMU accepts them and the guest sees nothing.
#[rustfmt::skip]
pub const QCODES: [&str; 162] = [
    "unmapped", "shift", "shift_r", "alt", "alt_r", "ctrl", "ctrl_r", "menu", "esc", "1", "2",
    "3", "4", "5", "6", "7", "8", "9", "0", "minus", "equal", "backspace", "tab", "q", "w",
    "e", "r", "t", "y", "u", "i", "o", "p", "bracket_left", "bracket_right", "ret", "a", "s",
    "d", "f", "g", "h", "j", "k", "l", "semicolon", "apostrophe", "grave_accent", "backslash",
    "z", "x", "c", "v", "b", "n", "m", "comma", "dot", "slash", "asterisk", "spc", "caps_lock",
    "f1", "f2", "f3", "f4", "f5", "f6", "f7", "f8", "f9", "f10", "num_lock", "scroll_lock",
    "kp_divide", "kp_multiply", "kp_subtract", "kp_add", "kp_enter", "kp_decimal", "sysrq",
    "kp_0", "kp_1", "kp_2", "kp_3", "kp_4", "kp_5", "kp_6", "kp_7", "kp_8", "kp_9", "less",
    "f11", "f12", "print", "home", "pgup", "pgdn", "end", "left", "up", "down", "right",
    "insert", "delete", "stop", "again", "props", "undo", "front", "copy", "open", "paste",
    "find", "cut", "lf", "help", "meta_l", "meta_r", "compose", "pause", "ro", "hiragana",
    "henkan", "yen", "muhenkan", "katakanahiragana", "kp_comma", "kp_equals", "power", "sleep",
    "wake", "audionext", "audioprev", "audiostop", "audioplay", "audiomute", "volumeup",
    "volumedown", "mediaselect", "mail", "calculator", "computer", "ac_home", "ac_back",
    "ac_forward", "ac_refresh", "ac_bookmarks", "lang1", "lang2", "f13", "f14", "f15", "f16",
    "f17", "f18", "f19", "f20", "f21", "f22", "f23", "f24",
];

/// Longest text one `type_text` operation types, characters. Each character is up to
/// four key events; a longer text is several operations, so that one terminal cannot hold
/// a VM's keyboard for long.
pub const MAX_TEXT_CHARS: usize = 256;
/// Most keys in one `key_combo`.
pub const MAX_COMBO_KEYS: usize = 5;
/// Largest absolute pointer coordinate: QEMU's absolute axes run 0..=32767 across the
/// screen, whatever its resolution.
pub const MAX_POINTER_COORD: u16 = 0x7fff;
/// Most wheel notches one `wheel` operation turns, either way.
pub const MAX_WHEEL_NOTCHES: i8 = 10;

/// One of QEMU's key codes ([`QCODES`]). On the wire it is the name, e.g. `"ctrl"`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QCode(u8);

impl QCode {
    /// The code named `name`, if QEMU has one.
    pub fn from_name(name: &str) -> Option<QCode> {
        QCODES
            .iter()
            .position(|q| *q == name)
            .and_then(|i| u8::try_from(i).ok())
            .map(QCode)
    }

    /// Like [`QCode::from_name`], with an error naming `field`.
    pub fn parse(field: &str, name: &str) -> Result<QCode, ValidationError> {
        Self::from_name(name).ok_or_else(|| {
            ValidationError::new(
                field,
                format!(
                    "unknown QEMU key code {:?} (QEMU's QKeyCode names, e.g. \"a\", \"ret\", \"ctrl\", \"f1\")",
                    crate::validate::truncate(name, 40)
                ),
            )
        })
    }

    /// QEMU's name of the code.
    pub fn as_str(self) -> &'static str {
        QCODES[usize::from(self.0)]
    }

    /// The code's position in [`QCODES`]: an index for tables kept in the same order.
    pub fn index(self) -> usize {
        usize::from(self.0)
    }

    /// Every code, in QEMU's order.
    pub fn all() -> impl Iterator<Item = QCode> {
        (0..QCODES.len()).map(|i| QCode(u8::try_from(i).expect("162 codes fit in a u8")))
    }

    fn named(name: &str) -> QCode {
        Self::from_name(name).expect("the name is in QCODES (tested)")
    }
}

impl fmt::Debug for QCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "QCode({})", self.as_str())
    }
}

impl fmt::Display for QCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for QCode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for QCode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = Cow::<'de, str>::deserialize(d)?;
        QCode::parse("qcode", &name).map_err(serde::de::Error::custom)
    }
}

impl utoipa::PartialSchema for QCode {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        use utoipa::openapi::schema::{ObjectBuilder, SchemaType, Type};
        ObjectBuilder::new()
            .schema_type(SchemaType::new(Type::String))
            .description(Some("A QEMU key code (QKeyCode in QEMU's qapi/ui.json)."))
            .enum_values(Some(QCODES))
            .into()
    }
}

impl ToSchema for QCode {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("QCode")
    }
}

/// A pointer button.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PointerButton {
    /// The left (primary) button.
    Left,
    /// The middle button (the wheel pressed).
    Middle,
    /// The right (secondary) button.
    Right,
}

impl PointerButton {
    const ALL: [PointerButton; 3] = [Self::Left, Self::Middle, Self::Right];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Left => "left",
            Self::Middle => "middle",
            Self::Right => "right",
        }
    }
}

/// What a terminal's power button does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PowerAction {
    /// Power on. A VM whose hypervisor runs is on already; one that stopped is started by
    /// its agent, which has its spec (a compute driver alone cannot).
    On,
    /// Press the power button (ACPI): the guest decides how to shut down.
    Shutdown,
    /// Hard reset, as the reset button: the guest reboots at once.
    Reset,
    /// Stop the guest's CPUs (the VM stays in memory; input is refused while paused).
    Pause,
    /// Run a paused guest again.
    Resume,
}

impl PowerAction {
    const ALL: [PowerAction; 5] = [
        Self::On,
        Self::Shutdown,
        Self::Reset,
        Self::Pause,
        Self::Resume,
    ];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::On => "on",
            Self::Shutdown => "shutdown",
            Self::Reset => "reset",
            Self::Pause => "pause",
            Self::Resume => "resume",
        }
    }
}

/// One operation of a terminal on the VM bound to it (the body of an operation message).
/// Tagged by `op`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(
    tag = "op",
    rename_all = "snake_case",
    try_from = "RawOperation",
    deny_unknown_fields
)]
#[schema(as = TerminalOperation, example = json!({"op": "type_text", "text": "ls -l\n"}))]
pub enum Operation {
    /// One key goes down or up (a terminal that forwards raw key events sends these; it
    /// must send the up as well).
    Key {
        /// The key.
        qcode: QCode,
        /// Pressed (`true`) or released.
        down: bool,
    },
    /// Type a text on a US layout: each character is pressed and released, with Shift
    /// held around it where the layout needs it.
    TypeText {
        /// 1 to 256 characters of printable ASCII, `\n` (Return) and `\t` (Tab).
        text: String,
    },
    /// Press keys together and let go (`ctrl`, `alt`, `delete`): all go down in the
    /// order given, then up in reverse order, and nothing else is typed in between.
    KeyCombo {
        /// 1 to 5 different keys.
        qcodes: Vec<QCode>,
    },
    /// Move the pointer to an absolute position (a tablet, not a mouse).
    PointerMove {
        /// 0 (left edge) to 32767 (right edge).
        x: u16,
        /// 0 (top edge) to 32767 (bottom edge).
        y: u16,
    },
    /// Press or release a pointer button.
    PointerButton {
        /// The button.
        button: PointerButton,
        /// Pressed (`true`) or released.
        down: bool,
    },
    /// Turn the wheel: positive notches scroll up (away from the user), negative down.
    Wheel {
        /// -10 to 10 notches, not 0.
        delta: i8,
    },
    /// A power action.
    Power {
        /// What to do.
        action: PowerAction,
    },
    /// Take a picture of the VM's display (a PNG).
    Screenshot,
}

/// What a pointer or wheel event presses: a button, or a notch of the wheel (QEMU and
/// PS/2 report a notch as a press and a release of a wheel "button").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum InputButton {
    /// The left button.
    Left,
    /// The middle button.
    Middle,
    /// The right button.
    Right,
    /// One notch up.
    WheelUp,
    /// One notch down.
    WheelDown,
}

impl InputButton {
    /// The name in console lines (`wheel_up`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Left => "left",
            Self::Middle => "middle",
            Self::Right => "right",
            Self::WheelUp => "wheel_up",
            Self::WheelDown => "wheel_down",
        }
    }
}

impl From<PointerButton> for InputButton {
    fn from(b: PointerButton) -> Self {
        match b {
            PointerButton::Left => Self::Left,
            PointerButton::Middle => Self::Middle,
            PointerButton::Right => Self::Right,
        }
    }
}

/// One event a guest's keyboard or pointer sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum InputEvent {
    /// A key goes down or up.
    Key {
        /// The key.
        qcode: QCode,
        /// Down (`true`) or up.
        down: bool,
    },
    /// The pointer moves to an absolute position (0..=32767 on both axes).
    Move {
        /// Horizontal.
        x: u16,
        /// Vertical.
        y: u16,
    },
    /// A button (or wheel notch) goes down or up.
    Button {
        /// Which.
        button: InputButton,
        /// Down (`true`) or up.
        down: bool,
    },
}

fn updown(down: bool) -> &'static str {
    if down {
        "down"
    } else {
        "up"
    }
}

impl fmt::Display for InputEvent {
    /// `key a down`, `move 100 200`, `button wheel_up up`: the simulated guest's console
    /// lines (after `INPUT `).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Key { qcode, down } => write!(f, "key {qcode} {}", updown(*down)),
            Self::Move { x, y } => write!(f, "move {x} {y}"),
            Self::Button { button, down } => {
                write!(f, "button {} {}", button.as_str(), updown(*down))
            }
        }
    }
}

/// The key that types `c` on a US keyboard, and whether Shift must be held for it:
/// printable ASCII, `\n` (Return) and `\t` (Tab); `None` for anything else.
pub fn us_key(c: char) -> Option<(QCode, bool)> {
    let (name, shift): (&str, bool) = match c {
        'a'..='z' | '0'..='9' => {
            let mut buf = [0u8; 4];
            return Some((QCode::named(c.encode_utf8(&mut buf)), false));
        }
        'A'..='Z' => {
            let mut buf = [0u8; 4];
            let lower = c.to_ascii_lowercase();
            return Some((QCode::named(lower.encode_utf8(&mut buf)), true));
        }
        ' ' => ("spc", false),
        '\n' => ("ret", false),
        '\t' => ("tab", false),
        '!' => ("1", true),
        '@' => ("2", true),
        '#' => ("3", true),
        '$' => ("4", true),
        '%' => ("5", true),
        '^' => ("6", true),
        '&' => ("7", true),
        '*' => ("8", true),
        '(' => ("9", true),
        ')' => ("0", true),
        '-' => ("minus", false),
        '_' => ("minus", true),
        '=' => ("equal", false),
        '+' => ("equal", true),
        '[' => ("bracket_left", false),
        '{' => ("bracket_left", true),
        ']' => ("bracket_right", false),
        '}' => ("bracket_right", true),
        '\\' => ("backslash", false),
        '|' => ("backslash", true),
        ';' => ("semicolon", false),
        ':' => ("semicolon", true),
        '\'' => ("apostrophe", false),
        '"' => ("apostrophe", true),
        '`' => ("grave_accent", false),
        '~' => ("grave_accent", true),
        ',' => ("comma", false),
        '<' => ("comma", true),
        '.' => ("dot", false),
        '>' => ("dot", true),
        '/' => ("slash", false),
        '?' => ("slash", true),
        _ => return None,
    };
    Some((QCode::named(name), shift))
}

/// The key events that type `c` (see [`us_key`]): the key down and up, inside Shift
/// down and up where needed. Empty for a character [`us_key`] cannot type.
pub fn char_events(c: char) -> Vec<InputEvent> {
    let Some((qcode, shift)) = us_key(c) else {
        return Vec::new();
    };
    let key = |qcode, down| InputEvent::Key { qcode, down };
    let shift_code = QCode::named("shift");
    if shift {
        vec![
            key(shift_code, true),
            key(qcode, true),
            key(qcode, false),
            key(shift_code, false),
        ]
    } else {
        vec![key(qcode, true), key(qcode, false)]
    }
}

impl Operation {
    /// The `op` tag: `key`, `type_text`, ... (for logs and error messages).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Key { .. } => "key",
            Self::TypeText { .. } => "type_text",
            Self::KeyCombo { .. } => "key_combo",
            Self::PointerMove { .. } => "pointer_move",
            Self::PointerButton { .. } => "pointer_button",
            Self::Wheel { .. } => "wheel",
            Self::Power { .. } => "power",
            Self::Screenshot => "screenshot",
        }
    }

    /// Whether the operation is guest input (keyboard or pointer), as opposed to a power
    /// action or a screenshot.
    pub fn is_input(&self) -> bool {
        !matches!(self, Self::Power { .. } | Self::Screenshot)
    }

    /// Checks what the types cannot: text length and characters, combination size and
    /// repeats, coordinate and wheel ranges. Names the field.
    pub fn validate(&self) -> Result<(), ValidationError> {
        match self {
            Self::Key { .. }
            | Self::PointerButton { .. }
            | Self::Power { .. }
            | Self::Screenshot => Ok(()),
            Self::TypeText { text } => validate_text(text),
            Self::KeyCombo { qcodes } => {
                if qcodes.is_empty() || qcodes.len() > MAX_COMBO_KEYS {
                    return Err(ValidationError::new(
                        "qcodes",
                        format!("must name 1 to {MAX_COMBO_KEYS} keys, got {}", qcodes.len()),
                    ));
                }
                for (i, q) in qcodes.iter().enumerate() {
                    if let Some(j) = qcodes[..i].iter().position(|p| p == q) {
                        return Err(ValidationError::new(
                            format!("qcodes[{i}]"),
                            format!("\"{q}\" is qcodes[{j}] already: each key goes down once"),
                        ));
                    }
                }
                Ok(())
            }
            Self::PointerMove { x, y } => {
                crate::validate_range("x", *x, 0, MAX_POINTER_COORD)?;
                crate::validate_range("y", *y, 0, MAX_POINTER_COORD)?;
                Ok(())
            }
            Self::Wheel { delta } => {
                if *delta == 0 || delta.unsigned_abs() > MAX_WHEEL_NOTCHES.unsigned_abs() {
                    return Err(ValidationError::new(
                        "delta",
                        format!(
                            "must be between -{MAX_WHEEL_NOTCHES} and {MAX_WHEEL_NOTCHES} and not 0, got {delta}"
                        ),
                    ));
                }
                Ok(())
            }
        }
    }

    /// The guest input of the operation, in groups that belong together: one per
    /// character of a text (Shift around its key), the whole of a combination, the whole
    /// of a wheel turn. A driver keeps a group in one hypervisor command when it can, so
    /// that no guest sees half of one. Empty for power actions and screenshots.
    pub fn input_groups(&self) -> Vec<Vec<InputEvent>> {
        match self {
            Self::Key { qcode, down } => vec![vec![InputEvent::Key {
                qcode: *qcode,
                down: *down,
            }]],
            Self::TypeText { text } => text.chars().map(char_events).collect(),
            Self::KeyCombo { qcodes } => {
                let downs = qcodes.iter().map(|q| InputEvent::Key {
                    qcode: *q,
                    down: true,
                });
                let ups = qcodes.iter().rev().map(|q| InputEvent::Key {
                    qcode: *q,
                    down: false,
                });
                vec![downs.chain(ups).collect()]
            }
            Self::PointerMove { x, y } => vec![vec![InputEvent::Move { x: *x, y: *y }]],
            Self::PointerButton { button, down } => vec![vec![InputEvent::Button {
                button: (*button).into(),
                down: *down,
            }]],
            Self::Wheel { delta } => {
                let button = if *delta > 0 {
                    InputButton::WheelUp
                } else {
                    InputButton::WheelDown
                };
                let notch = [true, false].map(|down| InputEvent::Button { button, down });
                vec![(0..delta.unsigned_abs()).flat_map(|_| notch).collect()]
            }
            Self::Power { .. } | Self::Screenshot => Vec::new(),
        }
    }

    /// [`Operation::input_groups`], flattened: every input event in order.
    pub fn input_events(&self) -> Vec<InputEvent> {
        self.input_groups().into_iter().flatten().collect()
    }
}

fn validate_text(text: &str) -> Result<(), ValidationError> {
    let n = text.chars().count();
    if n == 0 || n > MAX_TEXT_CHARS {
        return Err(ValidationError::new(
            "text",
            format!("must be 1 to {MAX_TEXT_CHARS} characters, got {n}"),
        ));
    }
    if let Some((i, c)) = text.char_indices().find(|(_, c)| us_key(*c).is_none()) {
        return Err(ValidationError::new(
            "text",
            format!(
                "character {c:?} at byte {i} cannot be typed: only printable ASCII, \\n and \\t"
            ),
        ));
    }
    Ok(())
}

/// The wire shape before validation: names and numbers as sent, so that every refusal
/// can name its field (serde's own errors for a bad enum value or an out-of-range
/// number name none).
#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
enum RawOperation {
    Key { qcode: String, down: bool },
    TypeText { text: String },
    KeyCombo { qcodes: Vec<String> },
    PointerMove { x: i64, y: i64 },
    PointerButton { button: String, down: bool },
    Wheel { delta: i64 },
    Power { action: String },
    // A struct variant, so that `deny_unknown_fields` covers it too.
    Screenshot {},
}

fn one_of<T: Copy>(
    field: &str,
    value: &str,
    all: &[T],
    name: impl Fn(T) -> &'static str,
) -> Result<T, ValidationError> {
    all.iter()
        .copied()
        .find(|v| name(*v) == value)
        .ok_or_else(|| {
            let names: Vec<&str> = all.iter().map(|v| name(*v)).collect();
            ValidationError::new(
                field,
                format!(
                    "must be one of {}, got {:?}",
                    names.join(", "),
                    crate::validate::truncate(value, 40)
                ),
            )
        })
}

fn coord(field: &str, v: i64) -> Result<u16, ValidationError> {
    u16::try_from(crate::validate_range(
        field,
        v,
        0,
        i64::from(MAX_POINTER_COORD),
    )?)
    .map_err(|_| ValidationError::new(field, "out of range"))
}

impl TryFrom<RawOperation> for Operation {
    type Error = ValidationError;

    fn try_from(raw: RawOperation) -> Result<Self, Self::Error> {
        let op = match raw {
            RawOperation::Key { qcode, down } => Operation::Key {
                qcode: QCode::parse("qcode", &qcode)?,
                down,
            },
            RawOperation::TypeText { text } => Operation::TypeText { text },
            RawOperation::KeyCombo { qcodes } => {
                if qcodes.len() > MAX_COMBO_KEYS {
                    return Err(ValidationError::new(
                        "qcodes",
                        format!("must name 1 to {MAX_COMBO_KEYS} keys, got {}", qcodes.len()),
                    ));
                }
                let qcodes = qcodes
                    .iter()
                    .enumerate()
                    .map(|(i, q)| QCode::parse(&format!("qcodes[{i}]"), q))
                    .collect::<Result<Vec<_>, _>>()?;
                Operation::KeyCombo { qcodes }
            }
            RawOperation::PointerMove { x, y } => Operation::PointerMove {
                x: coord("x", x)?,
                y: coord("y", y)?,
            },
            RawOperation::PointerButton { button, down } => Operation::PointerButton {
                button: one_of(
                    "button",
                    &button,
                    &PointerButton::ALL,
                    PointerButton::as_str,
                )?,
                down,
            },
            RawOperation::Wheel { delta } => {
                let max = i64::from(MAX_WHEEL_NOTCHES);
                let delta = i8::try_from(delta)
                    .ok()
                    .filter(|d| i64::from(*d).abs() <= max && *d != 0)
                    .ok_or_else(|| {
                        ValidationError::new(
                            "delta",
                            format!("must be between -{max} and {max} and not 0, got {delta}"),
                        )
                    })?;
                Operation::Wheel { delta }
            }
            RawOperation::Power { action } => Operation::Power {
                action: one_of("action", &action, &PowerAction::ALL, PowerAction::as_str)?,
            },
            RawOperation::Screenshot {} => Operation::Screenshot,
        };
        op.validate()?;
        Ok(op)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<Operation, String> {
        serde_json::from_str::<Operation>(json).map_err(|e| e.to_string())
    }

    fn q(name: &str) -> QCode {
        QCode::from_name(name).unwrap()
    }

    fn keys(events: &[InputEvent]) -> Vec<String> {
        events.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn qcodes_are_unique_and_round_trip() {
        let mut seen = std::collections::HashSet::new();
        for (i, name) in QCODES.iter().enumerate() {
            assert!(seen.insert(*name), "{name} twice");
            let c = QCode::from_name(name).unwrap();
            assert_eq!(c.as_str(), *name);
            assert_eq!(QCode::all().nth(i), Some(c));
            let json = serde_json::to_string(&c).unwrap();
            assert_eq!(serde_json::from_str::<QCode>(&json).unwrap(), c);
        }
        assert_eq!(QCode::all().count(), QCODES.len());
        assert!(QCode::from_name("ctl").is_none());
        assert!(QCode::from_name("").is_none());
    }

    #[test]
    fn every_typeable_character_maps_to_a_key() {
        let mut typeable = 0;
        for b in 0u8..=127 {
            let c = char::from(b);
            let expect = (0x20..=0x7e).contains(&b) || c == '\n' || c == '\t';
            assert_eq!(us_key(c).is_some(), expect, "{c:?}");
            if expect {
                typeable += 1;
            }
        }
        assert_eq!(typeable, 95 + 2);
        for c in ['é', '\u{7f}', '\r', '\0', '€'] {
            assert!(us_key(c).is_none(), "{c:?}");
        }
        // Shifted and unshifted characters of a key never collide.
        let mut by_key = std::collections::HashMap::new();
        for b in 0u8..=127 {
            if let Some(k) = us_key(char::from(b)) {
                assert!(by_key.insert(k, b).is_none(), "{:?} twice", k);
            }
        }
    }

    #[test]
    fn text_is_typed_with_shift_where_the_us_layout_needs_it() {
        let op = Operation::TypeText {
            text: "Hi\n".into(),
        };
        assert_eq!(
            keys(&op.input_events()),
            [
                "key shift down",
                "key h down",
                "key h up",
                "key shift up",
                "key i down",
                "key i up",
                "key ret down",
                "key ret up"
            ]
        );
        assert_eq!(op.input_groups().len(), 3);
        assert_eq!(us_key('?'), Some((q("slash"), true)));
        assert_eq!(us_key('/'), Some((q("slash"), false)));
        assert_eq!(us_key('"'), Some((q("apostrophe"), true)));
        assert_eq!(us_key('~'), Some((q("grave_accent"), true)));
        assert_eq!(us_key(')'), Some((q("0"), true)));
        assert_eq!(us_key('\t'), Some((q("tab"), false)));
        assert_eq!(us_key(' '), Some((q("spc"), false)));
        assert_eq!(us_key('Z'), Some((q("z"), true)));
    }

    #[test]
    fn combos_go_down_in_order_and_up_in_reverse() {
        let op = parse(r#"{"op":"key_combo","qcodes":["ctrl","alt","delete"]}"#).unwrap();
        assert_eq!(
            keys(&op.input_events()),
            [
                "key ctrl down",
                "key alt down",
                "key delete down",
                "key delete up",
                "key alt up",
                "key ctrl up"
            ]
        );
        assert_eq!(op.input_groups().len(), 1);
    }

    #[test]
    fn wheel_turns_are_notches_of_press_and_release() {
        let op = parse(r#"{"op":"wheel","delta":-2}"#).unwrap();
        assert_eq!(
            keys(&op.input_events()),
            [
                "button wheel_down down",
                "button wheel_down up",
                "button wheel_down down",
                "button wheel_down up"
            ]
        );
        let op = parse(r#"{"op":"wheel","delta":1}"#).unwrap();
        assert_eq!(
            keys(&op.input_events()),
            ["button wheel_up down", "button wheel_up up"]
        );
    }

    #[test]
    fn every_shape_round_trips() {
        for json in [
            r#"{"op":"key","qcode":"a","down":true}"#,
            r#"{"op":"type_text","text":"ls -l\n\t~"}"#,
            r#"{"op":"key_combo","qcodes":["ctrl","alt","delete"]}"#,
            r#"{"op":"pointer_move","x":0,"y":32767}"#,
            r#"{"op":"pointer_button","button":"middle","down":false}"#,
            r#"{"op":"wheel","delta":10}"#,
            r#"{"op":"power","action":"reset"}"#,
            r#"{"op":"screenshot"}"#,
        ] {
            let op = parse(json).unwrap_or_else(|e| panic!("{json}: {e}"));
            assert_eq!(serde_json::to_string(&op).unwrap(), json);
            assert!(op.validate().is_ok());
            assert_eq!(op.is_input(), !matches!(op.kind(), "power" | "screenshot"));
            assert!(json.contains(op.kind()));
        }
    }

    #[test]
    fn refusals_name_the_field() {
        for (json, starts) in [
            (
                r#"{"op":"key","qcode":"ctl","down":true}"#,
                "qcode: unknown QEMU key code \"ctl\"",
            ),
            (
                r#"{"op":"key_combo","qcodes":["ctrl","alt","dlete"]}"#,
                "qcodes[2]: unknown QEMU key code",
            ),
            (
                r#"{"op":"key_combo","qcodes":["ctrl","alt","ctrl"]}"#,
                "qcodes[2]: \"ctrl\" is qcodes[0] already",
            ),
            (
                r#"{"op":"key_combo","qcodes":[]}"#,
                "qcodes: must name 1 to 5 keys, got 0",
            ),
            (
                r#"{"op":"key_combo","qcodes":["a","b","c","d","e","f"]}"#,
                "qcodes: must name 1 to 5 keys, got 6",
            ),
            (
                r#"{"op":"type_text","text":""}"#,
                "text: must be 1 to 256 characters, got 0",
            ),
            (
                r#"{"op":"type_text","text":"caf\u00e9"}"#,
                "text: character 'é' at byte 3 cannot be typed",
            ),
            (
                r#"{"op":"type_text","text":"a\rb"}"#,
                "text: character '\\r' at byte 1",
            ),
            (
                r#"{"op":"pointer_move","x":32768,"y":0}"#,
                "x: must be between 0 and 32767, got 32768",
            ),
            (
                r#"{"op":"pointer_move","x":0,"y":-1}"#,
                "y: must be between 0 and 32767, got -1",
            ),
            (
                r#"{"op":"pointer_button","button":"back","down":true}"#,
                "button: must be one of left, middle, right, got \"back\"",
            ),
            (
                r#"{"op":"wheel","delta":0}"#,
                "delta: must be between -10 and 10 and not 0, got 0",
            ),
            (
                r#"{"op":"wheel","delta":-300}"#,
                "delta: must be between -10 and 10 and not 0, got -300",
            ),
            (
                r#"{"op":"power","action":"off"}"#,
                "action: must be one of on, shutdown, reset, pause, resume, got \"off\"",
            ),
            (
                r#"{"op":"key","qcode":"a","down":true,"vm":"other"}"#,
                "unknown field `vm`",
            ),
            (r#"{"op":"screenshot","vm":"other"}"#, "unknown field `vm`"),
            (r#"{"op":"launch"}"#, "unknown variant `launch`"),
            (r#"{"op":"key","qcode":"a"}"#, "missing field `down`"),
        ] {
            let e = parse(json).expect_err(json);
            assert!(e.starts_with(starts), "{json}: {e}");
        }
        let long = format!(r#"{{"op":"type_text","text":"{}"}}"#, "x".repeat(257));
        assert!(parse(&long)
            .unwrap_err()
            .starts_with("text: must be 1 to 256 characters, got 257"));
        assert!(parse(&long.replace(&"x".repeat(257), &"x".repeat(256))).is_ok());
    }

    #[test]
    fn values_built_in_rust_are_validated_too() {
        let bad = [
            Operation::PointerMove { x: 40000, y: 1 },
            Operation::Wheel { delta: 11 },
            Operation::Wheel { delta: i8::MIN },
            Operation::KeyCombo { qcodes: vec![] },
            Operation::TypeText {
                text: "\u{1b}[A".into(),
            },
        ];
        for op in bad {
            assert!(op.validate().is_err(), "{op:?}");
        }
    }

    #[test]
    fn the_schema_lists_every_qcode() {
        use utoipa::PartialSchema;
        let s = serde_json::to_value(QCode::schema()).unwrap();
        assert_eq!(s["enum"].as_array().unwrap().len(), QCODES.len());
        let op = serde_json::to_value(Operation::schema()).unwrap();
        assert!(op.to_string().contains("type_text"), "{op}");
    }
}
