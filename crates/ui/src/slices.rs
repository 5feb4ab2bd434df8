//! Slices: the network slice instances (NSIs) with their load, the client associations,
//! and the slice ledger: its signed head checked against the ledger's keys, and (for an
//! admin, who may read proofs in the API) each recent association's inclusion proof
//! recomputed to the head's root. These checks use the keys the store lists: they catch
//! a store whose entries no longer match what was signed, not a server that lies; the
//! independent audit is `vinfra ledger verify --key …` with a key obtained elsewhere.

use api::{ApiError, AppState};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use maud::{html, Markup};
use model::slices::{Association, LedgerHead, Nsi};
use model::Role;

use crate::layout::{self, badge};
use crate::session::Session;

/// Associations whose proofs the page checks (the most recent).
const PROVED: usize = 20;

async fn load(state: &AppState, s: &Session) -> Result<(Vec<Nsi>, Vec<Association>), ApiError> {
    s.caller
        .require(&[Role::Admin, Role::Member], "listing network slices")?;
    let c = state.control();
    let scope = s.caller.scope()?;
    let nsis = c.nsis(scope).await?;
    let mut assoc = c.slice_associations(scope).await?;
    assoc.sort_by_key(|a| std::cmp::Reverse(a.ledger_index));
    Ok((nsis, assoc))
}

fn tables(nsis: &[Nsi], assoc: &[Association]) -> Markup {
    html! {
        table #nsis-table {
            caption { "Slice instances (" (nsis.len()) ")" }
            thead { tr {
                th scope="col" { "NSI" } th scope="col" { "S-NSSAI" } th scope="col" { "Provider" }
                th scope="col" { "NS instance" } th scope="col" { "Clients" } th scope="col" { "Measured load" }
                th scope="col" { "CPU (forecast / vCPUs)" }
            } }
            tbody {
                @for n in nsis {
                    tr data-nsi=(n.name) {
                        th scope="row" { (n.name) }
                        td { (n.snssai) }
                        td { (n.provider) }
                        td { @match &n.ns_instance { Some(i) => (i), None => "—" } }
                        td { (n.clients) " / " (n.max_clients) }
                        td {
                            @match n.measured_mbps {
                                Some(m) => {
                                    meter min="0" max=(n.capacity_mbps) value=(m) aria-label={ "load of " (n.name) } {}
                                    " " (format!("{m:.0}")) " / " (n.capacity_mbps) " Mbit/s"
                                }
                                None => { "— / " (n.capacity_mbps) " Mbit/s" }
                            }
                        }
                        td {
                            @match (n.forecast_cores.or(n.measured_cores), n.vcpus) {
                                (Some(c), Some(v)) => {
                                    meter min="0" max=(v) value=(c) aria-label={ "CPU of " (n.name) } {}
                                    " " (format!("{c:.2}")) " / " (v) " cores"
                                }
                                _ => "—"
                            }
                        }
                    }
                }
            }
        }
        table #associations-table {
            caption { "Client associations (" (assoc.len()) "), newest first" }
            thead { tr {
                th scope="col" { "Client" } th scope="col" { "S-NSSAI" } th scope="col" { "NSI" }
                th scope="col" { "Candidates" } th scope="col" { "Ledger entry" } th scope="col" { "At" }
            } }
            tbody {
                @for a in assoc {
                    tr data-client=(a.client) {
                        th scope="row" { (a.client) }
                        td { (a.snssai) }
                        td { (a.nsi_name) }
                        td { (a.candidates.len()) }
                        td { "#" (a.ledger_index) }
                        td { (layout::clock(a.created_at)) }
                    }
                }
            }
        }
    }
}

/// The head's checkpoint checked against the ledger's keys: the key id that signed it.
fn check_head(head: &LedgerHead) -> Result<String, String> {
    let mut keys = translog::verify::TrustedKeys::new();
    for k in &head.keys {
        let raw = translog::hash::from_hex(k.public_key.trim())
            .ok_or_else(|| format!("key {} is not hex", k.id))?;
        keys.add(&raw);
    }
    let v = translog::verify::verify_checkpoint(&keys, head.checkpoint.as_bytes())
        .map_err(|e| model::error_chain(&e))?;
    if v.size != head.size || translog::hash::to_hex(&v.root) != head.root {
        return Err(format!(
            "the signed checkpoint (size {}) is not the head (size {})",
            v.size, head.size
        ));
    }
    Ok(v.key_id)
}

/// Association `a`'s entry proved included in the tree of the head's size and root.
async fn check_inclusion(
    state: &AppState,
    head: &LedgerHead,
    a: &Association,
) -> Result<(), String> {
    let p = state
        .control()
        .ledger_proof(a.ledger_index, Some(head.size))
        .await
        .map_err(|e| model::error_chain(&e))?;
    let hash = |h: &str| -> Result<translog::hash::Hash, String> {
        translog::hash::from_hex(h)
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| format!("{h:?} is not a hash"))
    };
    let path = p
        .inclusion
        .iter()
        .map(|h| hash(h))
        .collect::<Result<Vec<_>, _>>()?;
    let root = hash(&head.root)?;
    let leaf = translog::hash::leaf_hash(p.entry.as_bytes());
    translog::verify::verify_inclusion(a.ledger_index, head.size, &leaf, &path, &root)
        .map_err(|e| e.to_string())?;
    if !p.entry.contains(&a.id) {
        return Err("the proved entry is not this association's".to_owned());
    }
    Ok(())
}

async fn ledger(state: &AppState, s: &Session, assoc: &[Association]) -> Markup {
    let head = match state.control().ledger_head().await {
        Ok(h) => h,
        Err(e) => return html! { p.error role="alert" { (ApiError::from(e).problem().detail) } },
    };
    let signed = check_head(&head);
    let mut proofs = Vec::new();
    if s.is_admin() && head.size > 0 {
        for a in assoc.iter().take(PROVED) {
            proofs.push((a, check_inclusion(state, &head, a).await));
        }
    }
    html! {
        section aria-labelledby="ledger-h" {
            h2 #ledger-h { "Ledger" }
            dl.facts #ledger-head {
                dt { "Entries" } dd { (head.size) }
                dt { "Root" } dd { code { (head.root) } }
                dt { "Signed head" } dd.signature {
                    @match &signed {
                        Ok(k) => { (badge("verified")) " signed by key " code { (k) } }
                        Err(e) => { (badge("failed")) " " span.error { (e) } }
                    }
                }
            }
            @if !proofs.is_empty() {
                table #proofs-table {
                    caption { "Inclusion proofs of the " (proofs.len()) " most recent associations, recomputed to the root above" }
                    thead { tr { th scope="col" { "Client" } th scope="col" { "Entry" } th scope="col" { "Proof" } } }
                    tbody {
                        @for (a, r) in &proofs {
                            tr data-proof=(a.client) {
                                th scope="row" { (a.client) }
                                td { "#" (a.ledger_index) }
                                td { @match r { Ok(()) => (badge("verified")), Err(e) => { (badge("failed")) " " span.error { (e) } } } }
                            }
                        }
                    }
                }
            }
            p.muted { "Checked with the keys the store lists: the independent audit is "
                code { "vinfra ledger verify --key HEX" } " with a key obtained elsewhere." }
        }
    }
}

/// `GET /ui/slices`.
pub(crate) async fn page(State(state): State<AppState>, s: Session) -> Response {
    match load(&state, &s).await {
        Ok((nsis, assoc)) => {
            let proof = ledger(&state, &s, &assoc).await;
            let body = html! {
                (layout::live("slices-live", "/ui/slices/live", "network slices", tables(&nsis, &assoc)))
                (proof)
            };
            layout::page(&s, "/ui/slices", "Slices", None, body).into_response()
        }
        Err(e) => layout::error_page(&e),
    }
}

/// `GET /ui/slices/live`.
pub(crate) async fn live(State(state): State<AppState>, s: Session) -> Response {
    layout::fragment(
        load(&state, &s)
            .await
            .map(|(nsis, assoc)| tables(&nsis, &assoc)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_that_does_not_check_out_is_reported() {
        let mut head = LedgerHead {
            origin: "vinfra-slices".into(),
            size: 1,
            root: "00".repeat(32),
            checkpoint: "{}".into(),
            keys: Vec::new(),
        };
        assert!(check_head(&head).is_err());
        head.checkpoint = r#"{"text":"x\n1\n00\n0\n","key_id":"k","signature":"00"}"#.into();
        let e = check_head(&head).unwrap_err();
        assert!(!e.is_empty());
        head.keys.push(model::slices::LedgerKey {
            id: "k".into(),
            public_key: "not hex".into(),
        });
        assert!(check_head(&head).unwrap_err().contains("not hex"));
    }
}
