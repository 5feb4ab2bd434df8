//! [`name_type!`](crate::name_type): the one definition of the string-newtype names that
//! several crates keep (switches, domains, storages, servers).

/// Defines `pub struct $name(pub String)`: a name that serializes as a plain string, with
/// `new`, `as_str`, `Display` and `From<&str>`. The calling crate needs `serde` (with
/// `derive`) as a dependency.
///
/// ```
/// model::name_type!(
///     /// One virtual switch, i.e. one host.
///     SwitchId
/// );
/// let s = SwitchId::from("host-a");
/// assert_eq!(s.to_string(), "host-a");
/// assert_eq!(serde_json::to_string(&s).unwrap(), "\"host-a\"");
/// assert_eq!(SwitchId::new("host-a").as_str(), "host-a");
/// ```
#[macro_export]
macro_rules! name_type {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(
            Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, ::serde::Serialize, ::serde::Deserialize,
        )]
        #[serde(transparent)]
        pub struct $name(pub String);

        impl $name {
            /// Wraps a name.
            pub fn new(name: impl Into<String>) -> Self {
                Self(name.into())
            }

            /// The name as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                Self(s.to_owned())
            }
        }
    };
}
