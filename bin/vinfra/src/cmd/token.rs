//! `vinfra token …`: mint, list and revoke API tokens.

use anyhow::{bail, Context};
use model::api::{CreateToken, TokenInfo};
use model::{Role, TokenId, TokenScope};

use crate::cmd::Ctx;
use crate::output;

/// Token commands.
#[derive(Debug, clap::Subcommand)]
pub enum TokenCmd {
    /// Mint a token; the secret is printed once and never shown again.
    Create {
        /// Role: member (default; a member mints for its own tenant), admin or agent.
        #[arg(long, default_value = "member", value_parser = parse_role)]
        role: Role,
        /// Tenant of a member token (an admin must name it; a member may omit it).
        #[arg(long)]
        tenant: Option<String>,
        /// Lifetime: seconds, or a number with s, m, h or d (`90m`, `30d`).
        /// Default: 30 days; agent tokens never expire unless given one.
        #[arg(long, value_parser = parse_ttl)]
        ttl: Option<u64>,
        /// Only GET and HEAD: for dashboards, scrapers and audits.
        #[arg(long)]
        read_only: bool,
        /// What the token is for, shown in `vinfra token list`.
        #[arg(long)]
        description: Option<String>,
    },
    /// List tokens (ids, prefixes and metadata; never a secret).
    List,
    /// Mint a one-time join token for an agent on another machine (the server must
    /// serve TLS); pass it to `vinfra agent --join-token`.
    Join {
        /// Lifetime if unused: seconds, or a number with s, m, h or d (default 1h).
        #[arg(long, value_parser = parse_ttl)]
        ttl: Option<u64>,
    },
    /// Revoke a token at once, on every server.
    Revoke {
        /// Token id (from `vinfra token list`).
        id: String,
    },
}

fn parse_role(s: &str) -> Result<Role, String> {
    match s {
        "member" => Ok(Role::Member),
        "admin" => Ok(Role::Admin),
        "agent" => Ok(Role::Agent),
        _ => Err(format!("{s:?} is not a role: member, admin or agent")),
    }
}

/// `30d` → 2592000: a number of seconds, or a number with a unit s, m, h, d.
fn parse_ttl(s: &str) -> Result<u64, String> {
    let (num, unit) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => (&s[..i], c),
        _ => (s, 's'),
    };
    let mult = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => return Err(format!("{s:?}: the unit must be s, m, h or d")),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration such as 3600, 90m or 30d"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too long"))
}

/// `at` relative to `now` (unix ms), for people: `in 29d 23h`, `3h ago`.
fn relative(at: u64, now: u64) -> String {
    let span = |ms: u64| {
        let s = ms / 1000;
        match s {
            0..=59 => format!("{s}s"),
            60..=3599 => format!("{}m", s / 60),
            3600..=86_399 => format!("{}h {}m", s / 3600, s % 3600 / 60),
            _ => format!("{}d {}h", s / 86_400, s % 86_400 / 3600),
        }
    };
    if at > now {
        format!("in {}", span(at - now))
    } else {
        format!("expired {} ago", span(now - at))
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn show(ctx: &Ctx, tokens: &[TokenInfo]) -> anyhow::Result<()> {
    let now = now_ms();
    output::emit(
        ctx.format,
        &tokens,
        &[
            "id",
            "prefix",
            "role",
            "scope",
            "expires",
            "tenant",
            "description",
        ],
        || {
            tokens
                .iter()
                .map(|t| {
                    vec![
                        t.id.to_string(),
                        t.prefix.clone(),
                        t.role.as_str().to_owned(),
                        t.scope.as_str().to_owned(),
                        t.expires_at
                            .map_or_else(|| "never".to_owned(), |e| relative(e, now)),
                        t.tenant.map(|t| t.to_string()).unwrap_or_default(),
                        t.description.clone().unwrap_or_default(),
                    ]
                })
                .collect()
        },
    )
}

/// Runs a token command.
pub async fn run(ctx: &Ctx, cmd: TokenCmd) -> anyhow::Result<()> {
    let c = ctx.client()?;
    match cmd {
        TokenCmd::Create {
            role,
            tenant,
            ttl,
            read_only,
            description,
        } => {
            let req = CreateToken {
                role,
                tenant,
                ttl_secs: ttl,
                scope: if read_only {
                    TokenScope::ReadOnly
                } else {
                    TokenScope::ReadWrite
                },
                description,
            };
            let created = c.create_token(&req).await?;
            match ctx.format {
                output::Format::Json => {
                    println!("{}", serde_json::to_string_pretty(&created)?);
                }
                output::Format::Table => {
                    let expires = created.expires_at.map_or_else(
                        || "never expires".to_owned(),
                        |e| format!("expires {}", relative(e, now_ms())),
                    );
                    eprintln!(
                        "token {} ({}, {}, {expires})",
                        created.id,
                        created.role.as_str(),
                        created.scope.as_str()
                    );
                    println!("{}", created.token);
                }
            }
            eprintln!(
                "save this token now: it is not shown again (the server keeps only its hash)"
            );
            Ok(())
        }
        TokenCmd::List => show(ctx, &c.list_tokens().await?),
        TokenCmd::Join { ttl } => {
            let created = c
                .create_join_token(&model::api::CreateJoinToken { ttl_secs: ttl })
                .await?;
            println!("{}", created.token);
            eprintln!("works once; pass it to `vinfra agent --server https://… --join-token …`");
            Ok(())
        }
        TokenCmd::Revoke { id } => {
            let parsed: TokenId = id
                .parse()
                .with_context(|| format!("{id:?} is not a token id (see `vinfra token list`)"))?;
            if let Err(e) = c.revoke_token(parsed).await {
                if e.status() == Some(404) {
                    bail!("token {id} not found");
                }
                return Err(e.into());
            }
            eprintln!("token {id} revoked");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_takes_seconds_or_a_unit() {
        assert_eq!(parse_ttl("3600"), Ok(3600));
        assert_eq!(parse_ttl("90m"), Ok(5400));
        assert_eq!(parse_ttl("2h"), Ok(7200));
        assert_eq!(parse_ttl("30d"), Ok(30 * 86_400));
        assert!(parse_ttl("30w").is_err());
        assert!(parse_ttl("d").is_err());
        assert!(parse_ttl("-1").is_err());
    }

    #[test]
    fn expiry_reads_relative_to_now() {
        assert_eq!(relative(10_000 + 90_000, 10_000), "in 1m");
        assert_eq!(relative(0, 3_600_000), "expired 1h 0m ago");
        assert_eq!(relative(2 * 86_400_000 + 3_600_000, 0), "in 2d 1h");
    }
}
