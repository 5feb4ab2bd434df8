//! The scancodes QEMU's PS/2 keyboard puts in the i8042 keyboard controller for each key
//! code, and how many of them the controller holds: what a driver needs to keep a burst of
//! key events from overflowing it, and what a test reads back through the controller.
//!
//! The table was read from QEMU 10.0.2 (`input-send-event` of each code, then the bytes at
//! I/O ports 0x64/0x60 through qtest, no modifier held); `tests/all/terminal.rs` reads it
//! again from the running QEMU for every code. Scan code set 2, as the keyboard sends it
//! before the controller's translation (QEMU leaves translation off until firmware turns
//! it on, so a guest-less VM shows set 2).
//!
//! Two keys depend on the modifiers held: `print` (`sysrq`) and `pause`. With a modifier
//! down they send fewer bytes than listed (Alt+Print: 4 down, 5 up; Ctrl+Pause: 5), so the
//! table's lengths are upper bounds for every state.

use model::terminal_ops::{QCode, QCODES};

/// Bytes the keyboard device queues before it drops what comes next (QEMU's
/// `PS2_QUEUE_SIZE`, `hw/input/ps2.c`; measured: of 20 key presses sent in one command, a
/// guest that did not read in between gets the first 16).
pub const QUEUE_BYTES: usize = 16;

/// (down, up) scancodes per code, in [`QCODES`] order.
static SET2: [(&[u8], &[u8]); QCODES.len()] = [
    (&[], &[]),                           // unmapped
    (&[0x12], &[0xf0, 0x12]),             // shift
    (&[0x59], &[0xf0, 0x59]),             // shift_r
    (&[0x11], &[0xf0, 0x11]),             // alt
    (&[0xe0, 0x11], &[0xe0, 0xf0, 0x11]), // alt_r
    (&[0x14], &[0xf0, 0x14]),             // ctrl
    (&[0xe0, 0x14], &[0xe0, 0xf0, 0x14]), // ctrl_r
    (&[], &[]),                           // menu
    (&[0x76], &[0xf0, 0x76]),             // esc
    (&[0x16], &[0xf0, 0x16]),             // 1
    (&[0x1e], &[0xf0, 0x1e]),             // 2
    (&[0x26], &[0xf0, 0x26]),             // 3
    (&[0x25], &[0xf0, 0x25]),             // 4
    (&[0x2e], &[0xf0, 0x2e]),             // 5
    (&[0x36], &[0xf0, 0x36]),             // 6
    (&[0x3d], &[0xf0, 0x3d]),             // 7
    (&[0x3e], &[0xf0, 0x3e]),             // 8
    (&[0x46], &[0xf0, 0x46]),             // 9
    (&[0x45], &[0xf0, 0x45]),             // 0
    (&[0x4e], &[0xf0, 0x4e]),             // minus
    (&[0x55], &[0xf0, 0x55]),             // equal
    (&[0x66], &[0xf0, 0x66]),             // backspace
    (&[0x0d], &[0xf0, 0x0d]),             // tab
    (&[0x15], &[0xf0, 0x15]),             // q
    (&[0x1d], &[0xf0, 0x1d]),             // w
    (&[0x24], &[0xf0, 0x24]),             // e
    (&[0x2d], &[0xf0, 0x2d]),             // r
    (&[0x2c], &[0xf0, 0x2c]),             // t
    (&[0x35], &[0xf0, 0x35]),             // y
    (&[0x3c], &[0xf0, 0x3c]),             // u
    (&[0x43], &[0xf0, 0x43]),             // i
    (&[0x44], &[0xf0, 0x44]),             // o
    (&[0x4d], &[0xf0, 0x4d]),             // p
    (&[0x54], &[0xf0, 0x54]),             // bracket_left
    (&[0x5b], &[0xf0, 0x5b]),             // bracket_right
    (&[0x5a], &[0xf0, 0x5a]),             // ret
    (&[0x1c], &[0xf0, 0x1c]),             // a
    (&[0x1b], &[0xf0, 0x1b]),             // s
    (&[0x23], &[0xf0, 0x23]),             // d
    (&[0x2b], &[0xf0, 0x2b]),             // f
    (&[0x34], &[0xf0, 0x34]),             // g
    (&[0x33], &[0xf0, 0x33]),             // h
    (&[0x3b], &[0xf0, 0x3b]),             // j
    (&[0x42], &[0xf0, 0x42]),             // k
    (&[0x4b], &[0xf0, 0x4b]),             // l
    (&[0x4c], &[0xf0, 0x4c]),             // semicolon
    (&[0x52], &[0xf0, 0x52]),             // apostrophe
    (&[0x0e], &[0xf0, 0x0e]),             // grave_accent
    (&[0x5d], &[0xf0, 0x5d]),             // backslash
    (&[0x1a], &[0xf0, 0x1a]),             // z
    (&[0x22], &[0xf0, 0x22]),             // x
    (&[0x21], &[0xf0, 0x21]),             // c
    (&[0x2a], &[0xf0, 0x2a]),             // v
    (&[0x32], &[0xf0, 0x32]),             // b
    (&[0x31], &[0xf0, 0x31]),             // n
    (&[0x3a], &[0xf0, 0x3a]),             // m
    (&[0x41], &[0xf0, 0x41]),             // comma
    (&[0x49], &[0xf0, 0x49]),             // dot
    (&[0x4a], &[0xf0, 0x4a]),             // slash
    (&[0x7c], &[0xf0, 0x7c]),             // asterisk
    (&[0x29], &[0xf0, 0x29]),             // spc
    (&[0x58], &[0xf0, 0x58]),             // caps_lock
    (&[0x05], &[0xf0, 0x05]),             // f1
    (&[0x06], &[0xf0, 0x06]),             // f2
    (&[0x04], &[0xf0, 0x04]),             // f3
    (&[0x0c], &[0xf0, 0x0c]),             // f4
    (&[0x03], &[0xf0, 0x03]),             // f5
    (&[0x0b], &[0xf0, 0x0b]),             // f6
    (&[0x83], &[0xf0, 0x83]),             // f7
    (&[0x0a], &[0xf0, 0x0a]),             // f8
    (&[0x01], &[0xf0, 0x01]),             // f9
    (&[0x09], &[0xf0, 0x09]),             // f10
    (&[0x77], &[0xf0, 0x77]),             // num_lock
    (&[0x7e], &[0xf0, 0x7e]),             // scroll_lock
    (&[0xe0, 0x4a], &[0xe0, 0xf0, 0x4a]), // kp_divide
    (&[0x7c], &[0xf0, 0x7c]),             // kp_multiply
    (&[0x7b], &[0xf0, 0x7b]),             // kp_subtract
    (&[0x79], &[0xf0, 0x79]),             // kp_add
    (&[0xe0, 0x5a], &[0xe0, 0xf0, 0x5a]), // kp_enter
    (&[0x71], &[0xf0, 0x71]),             // kp_decimal
    (
        &[0xe0, 0x12, 0xe0, 0x7c],
        &[0xe0, 0xf0, 0x7c, 0xe0, 0xf0, 0x12],
    ), // sysrq
    (&[0x70], &[0xf0, 0x70]),             // kp_0
    (&[0x69], &[0xf0, 0x69]),             // kp_1
    (&[0x72], &[0xf0, 0x72]),             // kp_2
    (&[0x7a], &[0xf0, 0x7a]),             // kp_3
    (&[0x6b], &[0xf0, 0x6b]),             // kp_4
    (&[0x73], &[0xf0, 0x73]),             // kp_5
    (&[0x74], &[0xf0, 0x74]),             // kp_6
    (&[0x6c], &[0xf0, 0x6c]),             // kp_7
    (&[0x75], &[0xf0, 0x75]),             // kp_8
    (&[0x7d], &[0xf0, 0x7d]),             // kp_9
    (&[0x61], &[0xf0, 0x61]),             // less
    (&[0x78], &[0xf0, 0x78]),             // f11
    (&[0x07], &[0xf0, 0x07]),             // f12
    (
        &[0xe0, 0x12, 0xe0, 0x7c],
        &[0xe0, 0xf0, 0x7c, 0xe0, 0xf0, 0x12],
    ), // print
    (&[0xe0, 0x6c], &[0xe0, 0xf0, 0x6c]), // home
    (&[0xe0, 0x7d], &[0xe0, 0xf0, 0x7d]), // pgup
    (&[0xe0, 0x7a], &[0xe0, 0xf0, 0x7a]), // pgdn
    (&[0xe0, 0x69], &[0xe0, 0xf0, 0x69]), // end
    (&[0xe0, 0x6b], &[0xe0, 0xf0, 0x6b]), // left
    (&[0xe0, 0x75], &[0xe0, 0xf0, 0x75]), // up
    (&[0xe0, 0x72], &[0xe0, 0xf0, 0x72]), // down
    (&[0xe0, 0x74], &[0xe0, 0xf0, 0x74]), // right
    (&[0xe0, 0x70], &[0xe0, 0xf0, 0x70]), // insert
    (&[0xe0, 0x71], &[0xe0, 0xf0, 0x71]), // delete
    (&[0xe0, 0x28], &[0xe0, 0xf0, 0x28]), // stop
    (&[], &[]),                           // again
    (&[], &[]),                           // props
    (&[], &[]),                           // undo
    (&[], &[]),                           // front
    (&[], &[]),                           // copy
    (&[], &[]),                           // open
    (&[], &[]),                           // paste
    (&[], &[]),                           // find
    (&[], &[]),                           // cut
    (&[], &[]),                           // lf
    (&[], &[]),                           // help
    (&[0xe0, 0x1f], &[0xe0, 0xf0, 0x1f]), // meta_l
    (&[0xe0, 0x27], &[0xe0, 0xf0, 0x27]), // meta_r
    (&[0xe0, 0x2f], &[0xe0, 0xf0, 0x2f]), // compose
    (&[0xe1, 0x14, 0x77, 0xe1, 0xf0, 0x14, 0xf0, 0x77], &[]), // pause
    (&[0x51], &[0xf0, 0x51]),             // ro
    (&[0x62], &[0xf0, 0x62]),             // hiragana
    (&[0x64], &[0xf0, 0x64]),             // henkan
    (&[0x6a], &[0xf0, 0x6a]),             // yen
    (&[0x67], &[0xf0, 0x67]),             // muhenkan
    (&[0x13], &[0xf0, 0x13]),             // katakanahiragana
    (&[0x6d], &[0xf0, 0x6d]),             // kp_comma
    (&[0x0f], &[0xf0, 0x0f]),             // kp_equals
    (&[0xe0, 0x37], &[0xe0, 0xf0, 0x37]), // power
    (&[0xe0, 0x3f], &[0xe0, 0xf0, 0x3f]), // sleep
    (&[0xe0, 0x5e], &[0xe0, 0xf0, 0x5e]), // wake
    (&[0xe0, 0x4d], &[0xe0, 0xf0, 0x4d]), // audionext
    (&[0xe0, 0x15], &[0xe0, 0xf0, 0x15]), // audioprev
    (&[0xe0, 0x3b], &[0xe0, 0xf0, 0x3b]), // audiostop
    (&[0xe0, 0x34], &[0xe0, 0xf0, 0x34]), // audioplay
    (&[0xe0, 0x23], &[0xe0, 0xf0, 0x23]), // audiomute
    (&[0xe0, 0x32], &[0xe0, 0xf0, 0x32]), // volumeup
    (&[0xe0, 0x21], &[0xe0, 0xf0, 0x21]), // volumedown
    (&[0xe0, 0x50], &[0xe0, 0xf0, 0x50]), // mediaselect
    (&[0xe0, 0x48], &[0xe0, 0xf0, 0x48]), // mail
    (&[0xe0, 0x2b], &[0xe0, 0xf0, 0x2b]), // calculator
    (&[0xe0, 0x40], &[0xe0, 0xf0, 0x40]), // computer
    (&[0xe0, 0x3a], &[0xe0, 0xf0, 0x3a]), // ac_home
    (&[0xe0, 0x38], &[0xe0, 0xf0, 0x38]), // ac_back
    (&[0xe0, 0x30], &[0xe0, 0xf0, 0x30]), // ac_forward
    (&[0xe0, 0x20], &[0xe0, 0xf0, 0x20]), // ac_refresh
    (&[0xe0, 0x18], &[0xe0, 0xf0, 0x18]), // ac_bookmarks
    (&[], &[]),                           // lang1
    (&[], &[]),                           // lang2
    (&[0x2f], &[0xf0, 0x2f]),             // f13
    (&[0x37], &[0xf0, 0x37]),             // f14
    (&[0x3f], &[0xf0, 0x3f]),             // f15
    (&[], &[]),                           // f16
    (&[], &[]),                           // f17
    (&[], &[]),                           // f18
    (&[], &[]),                           // f19
    (&[], &[]),                           // f20
    (&[], &[]),                           // f21
    (&[], &[]),                           // f22
    (&[], &[]),                           // f23
    (&[], &[]),                           // f24
];

/// The set-2 scancodes of `qcode` going down (`true`) or up, with no modifier held; empty
/// for codes that reach no PS/2 key.
pub fn scancodes(qcode: QCode, down: bool) -> &'static [u8] {
    let (d, u) = SET2[qcode.index()];
    if down {
        d
    } else {
        u
    }
}

/// The most bytes the event can put in the keyboard's queue, whatever modifiers are held.
pub fn max_bytes(qcode: QCode, down: bool) -> usize {
    scancodes(qcode, down).len()
}

/// The fewest bytes the event can put in the keyboard's queue, whatever modifiers are
/// held, for a guest that reads set 2 through the controller's translation to set 1 (what
/// the firmware sets up and Linux and Windows keep): QEMU then queues no `f0` (it sets the
/// translated code's high bit instead, `hw/input/ps2.c`, `ps2_put_keycode`). Alt+Print is
/// one byte each way, Ctrl+Pause four.
pub fn min_bytes(qcode: QCode, down: bool) -> usize {
    match (qcode.as_str(), down) {
        ("print" | "sysrq", _) => 1,
        ("pause", true) => 4,
        _ => scancodes(qcode, down)
            .iter()
            .filter(|b| **b != 0xf0)
            .count(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(name: &str) -> QCode {
        QCode::from_name(name).unwrap()
    }

    #[test]
    fn known_scancodes() {
        assert_eq!(scancodes(q("a"), true), [0x1c]);
        assert_eq!(scancodes(q("a"), false), [0xf0, 0x1c]);
        assert_eq!(scancodes(q("delete"), true), [0xe0, 0x71]);
        assert_eq!(scancodes(q("delete"), false), [0xe0, 0xf0, 0x71]);
        assert_eq!(max_bytes(q("pause"), true), 8);
        assert_eq!(max_bytes(q("pause"), false), 0);
        assert!(scancodes(q("unmapped"), true).is_empty());
        // Translated: a press and its release are one byte each, extended keys two.
        assert_eq!((min_bytes(q("a"), true), min_bytes(q("a"), false)), (1, 1));
        assert_eq!(min_bytes(q("delete"), false), 2);
        for c in QCode::all() {
            for down in [true, false] {
                assert!(min_bytes(c, down) <= max_bytes(c, down), "{c} {down}");
            }
        }
    }

    #[test]
    fn every_release_is_its_press_with_f0_or_nothing() {
        for c in QCode::all() {
            let (d, u) = (scancodes(c, true), scancodes(c, false));
            if c.as_str() == "pause" {
                continue; // make-only
            }
            if d.is_empty() {
                assert!(u.is_empty(), "{c}");
                continue;
            }
            // A press is `[e0] code` (print: two of those); its release puts f0 before
            // each code.
            let mut expect = Vec::new();
            for part in d.split_inclusive(|b| *b != 0xe0) {
                let (code, prefix) = part.split_last().unwrap();
                expect.extend_from_slice(prefix);
                expect.extend_from_slice(&[0xf0, *code]);
            }
            if c.as_str() == "print" || c.as_str() == "sysrq" {
                // released in reverse: e0 f0 7c, then e0 f0 12
                assert_eq!(u, [0xe0, 0xf0, 0x7c, 0xe0, 0xf0, 0x12], "{c}");
            } else {
                assert_eq!(u, expect.as_slice(), "{c}");
            }
            assert!(d.len() <= QUEUE_BYTES && u.len() <= QUEUE_BYTES);
        }
    }
}
