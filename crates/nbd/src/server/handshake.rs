//! Fixed newstyle negotiation: options until `EXPORT_NAME` or `GO` picks an export.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::connection::ConnError;
use super::{Export, Shared, MAX_OPTIONS, MAX_OPTION_LEN, MAX_REQUEST_LEN, PREFERRED_BLOCK};
use crate::proto::{self, *};
use crate::stream::Stream;
use crate::BlockDevice;

pub(super) struct Negotiated {
    pub(super) name: String,
    pub(super) export: Arc<Export>,
    pub(super) size: u64,
    pub(super) flags: u16,
    pub(super) structured: bool,
}

pub(super) fn transmission_flags(dev: &dyn BlockDevice, structured: bool) -> u16 {
    let mut flags = FLAG_HAS_FLAGS
        | FLAG_SEND_FLUSH
        | FLAG_SEND_FUA
        | FLAG_SEND_TRIM
        | FLAG_SEND_WRITE_ZEROES
        | FLAG_CAN_MULTI_CONN;
    if dev.read_only() {
        flags |= FLAG_READ_ONLY;
    }
    if structured {
        flags |= FLAG_SEND_DF;
    }
    flags
}

pub(super) fn push_reply(out: &mut Vec<u8>, option: u32, reply: u32, data: &[u8]) {
    encode_option_reply(out, option, reply, data);
}

/// Fixed newstyle negotiation. `Ok(None)`: the client aborted cleanly.
pub(super) fn negotiate(
    shared: &Shared,
    s: &mut Stream,
    deadline: Instant,
) -> Result<Option<Negotiated>, ConnError> {
    use std::io::Write;
    s.set_write_timeout(Some(shared.handshake_timeout))?;
    s.write_all(&encode_handshake(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))?;
    let mut cf = [0u8; 4];
    s.read_exact_by(&mut cf, deadline)?;
    let client_flags = u32::from_be_bytes(cf);
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(ConnError::Policy("unknown client flags"));
    }
    let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;
    let mut structured = false;
    let mut data = Vec::new();
    let mut out = Vec::with_capacity(512);
    for _ in 0..MAX_OPTIONS {
        let mut h = [0u8; OPTION_HEADER_LEN];
        s.read_exact_by(&mut h, deadline)?;
        let hdr = OptionHeader::parse(&h)?;
        out.clear();
        if hdr.length > MAX_OPTION_LEN {
            if hdr.option != OPT_EXPORT_NAME {
                push_reply(
                    &mut out,
                    hdr.option,
                    REP_ERR_TOO_BIG,
                    b"option data too long",
                );
                let _ = s.write_all(&out);
            }
            return Err(ConnError::Policy("option data too long"));
        }
        data.resize(len_usize(hdr.length), 0);
        s.read_exact_by(&mut data, deadline)?;
        if hdr.option == OPT_STARTTLS {
            match (&shared.tls, s.is_tls()) {
                (Some(cfg), false) if data.is_empty() => {
                    push_reply(&mut out, hdr.option, REP_ACK, &[]);
                    s.write_all(&out)?;
                    // Everything after this ACK, option haggling included, is inside TLS.
                    s.start_tls_server(cfg.clone(), deadline)?;
                }
                (Some(_), false) => {
                    push_reply(
                        &mut out,
                        hdr.option,
                        REP_ERR_INVALID,
                        b"STARTTLS takes no data",
                    );
                    s.write_all(&out)?;
                }
                (Some(_), true) => {
                    push_reply(&mut out, hdr.option, REP_ERR_INVALID, b"TLS is already on");
                    s.write_all(&out)?;
                }
                (None, _) => {
                    push_reply(
                        &mut out,
                        hdr.option,
                        REP_ERR_UNSUP,
                        b"this server has no TLS",
                    );
                    s.write_all(&out)?;
                }
            }
            continue;
        }
        if shared.tls_required && !s.is_tls() && hdr.option != OPT_ABORT {
            if hdr.option == OPT_EXPORT_NAME {
                // No reply is possible to EXPORT_NAME: end the connection.
                return Err(ConnError::Policy("TLS required"));
            }
            push_reply(
                &mut out,
                hdr.option,
                REP_ERR_TLS_REQD,
                b"TLS required (NBD_OPT_STARTTLS)",
            );
            s.write_all(&out)?;
            continue;
        }
        let opt = match ClientOption::parse(hdr.option, &data) {
            Ok(o) => o,
            Err(e) if hdr.option == OPT_EXPORT_NAME => return Err(e.into()),
            Err(e) => {
                push_reply(
                    &mut out,
                    hdr.option,
                    REP_ERR_INVALID,
                    e.to_string().as_bytes(),
                );
                s.write_all(&out)?;
                continue;
            }
        };
        let shutting_down = shared.shutting_down.load(Ordering::SeqCst);
        match opt {
            ClientOption::Abort => {
                push_reply(&mut out, hdr.option, REP_ACK, &[]);
                let _ = s.write_all(&out);
                return Ok(None);
            }
            ClientOption::ExportName(name) => {
                if shutting_down {
                    return Err(ConnError::Policy("shutting down"));
                }
                let export = shared
                    .export(&name)
                    .ok_or(ConnError::Policy("unknown export"))?;
                let size = export.dev.size();
                let flags = transmission_flags(&*export.dev, structured);
                encode_export_name_reply(&mut out, size, flags, no_zeroes);
                s.write_all(&out)?;
                return Ok(Some(Negotiated {
                    name,
                    export,
                    size,
                    flags,
                    structured,
                }));
            }
            _ if shutting_down => {
                push_reply(
                    &mut out,
                    hdr.option,
                    REP_ERR_SHUTDOWN,
                    b"server shutting down",
                );
            }
            ClientOption::List => {
                for name in shared.export_names() {
                    push_reply(&mut out, hdr.option, REP_SERVER, &encode_rep_server(&name));
                }
                push_reply(&mut out, hdr.option, REP_ACK, &[]);
            }
            ClientOption::StructuredReply => {
                if shared.structured_replies {
                    structured = true;
                    push_reply(&mut out, hdr.option, REP_ACK, &[]);
                } else {
                    push_reply(&mut out, hdr.option, REP_ERR_UNSUP, &[]);
                }
            }
            ClientOption::Info(req) | ClientOption::Go(req) => {
                let Some(export) = shared.export(&req.name) else {
                    let msg = format!("export {:?} not found", req.name);
                    push_reply(&mut out, hdr.option, REP_ERR_UNKNOWN, msg.as_bytes());
                    s.write_all(&out)?;
                    continue;
                };
                let size = export.dev.size();
                let flags = transmission_flags(&*export.dev, structured);
                push_reply(
                    &mut out,
                    hdr.option,
                    REP_INFO,
                    &encode_info_export(size, flags),
                );
                // Sent unasked too (allowed): these are the defaults, nothing to enforce.
                push_reply(
                    &mut out,
                    hdr.option,
                    REP_INFO,
                    &encode_info_block_size(1, PREFERRED_BLOCK, MAX_REQUEST_LEN),
                );
                if req.requests.contains(&INFO_NAME) {
                    let mut d = INFO_NAME.to_be_bytes().to_vec();
                    d.extend_from_slice(req.name.as_bytes());
                    push_reply(&mut out, hdr.option, REP_INFO, &d);
                }
                push_reply(&mut out, hdr.option, REP_ACK, &[]);
                if hdr.option == OPT_GO {
                    s.write_all(&out)?;
                    return Ok(Some(Negotiated {
                        name: req.name,
                        export,
                        size,
                        flags,
                        structured,
                    }));
                }
            }
            ClientOption::Unsupported(o) => {
                let msg = format!("{} ({o}) not supported", proto::option_name(o));
                push_reply(&mut out, o, REP_ERR_UNSUP, msg.as_bytes());
            }
        }
        s.write_all(&out)?;
    }
    Err(ConnError::Policy("too many options"))
}
