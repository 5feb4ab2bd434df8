//! Typed ids: a `VmId` is not a `HostId`, although both are UUIDs underneath.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A string that is not a UUID where an id was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} id {input:?} is not a UUID")]
pub struct IdParseError {
    /// Which kind of id was being parsed (`vm`, `host`, ...).
    pub kind: &'static str,
    /// The rejected text.
    pub input: String,
}

macro_rules! typed_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(
            Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord,
            Serialize, Deserialize, utoipa::ToSchema,
        )]
        #[serde(transparent)]
        #[schema(value_type = String, format = Uuid)]
        pub struct $name(pub Uuid);

        impl $name {
            /// A fresh random (v4) id.
            pub fn new_random() -> Self {
                Self(Uuid::new_v4())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl FromStr for $name {
            type Err = IdParseError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map(Self).map_err(|_| IdParseError {
                    kind: $kind,
                    input: s.to_owned(),
                })
            }
        }
    };
}

typed_id!(
    /// Identifies a virtual machine.
    VmId,
    "vm"
);
typed_id!(
    /// Identifies a host (a machine running a node agent).
    HostId,
    "host"
);
typed_id!(
    /// Identifies a tenant.
    TenantId,
    "tenant"
);
typed_id!(
    /// Identifies an image.
    ImageId,
    "image"
);
typed_id!(
    /// Identifies a live migration.
    MigrationId,
    "migration"
);
typed_id!(
    /// Identifies a terminal (a client that operates one VM by operation messages).
    TerminalId,
    "terminal"
);
typed_id!(
    /// Identifies a host maintenance session.
    MaintenanceId,
    "maintenance"
);
typed_id!(
    /// Identifies a virtual network.
    NetworkId,
    "network"
);
typed_id!(
    /// Identifies an API token (never the token itself: listing and revoking
    /// go by this id, so the secret is needed only to authenticate).
    TokenId,
    "token"
);

typed_id!(
    /// Identifies a resource table on a host.
    ResourceTableId,
    "resource table"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_reject_garbage() {
        let id = VmId::new_random();
        assert_eq!(id.to_string().parse::<VmId>().unwrap(), id);
        let err = "web-1".parse::<VmId>().unwrap_err();
        assert_eq!(err.to_string(), "vm id \"web-1\" is not a UUID");
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{id}\""));
    }
}
