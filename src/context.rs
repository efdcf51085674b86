//! `context` and `with_context`, as anyhow's `Context` trait has them, for
//! a layer's own error type: each layer keeps a typed error and still adds
//! what it was doing to it, so the message a user reads is the same chain.

/// Defines `pub trait Context<T>` for the error type `$error`, whose
/// variant `Context { context: String, source: Box<$error> }` holds what
/// was being done, and `$error::context`, which adds it; a `None` becomes
/// `$missing(context)`.
macro_rules! define_context {
    ($error:ident, $missing:path) => {
        impl $error {
            /// This error, met while doing what `context` says.
            pub fn context(self, context: impl std::fmt::Display) -> $error {
                $error::Context {
                    context: context.to_string(),
                    source: Box::new(self),
                }
            }
        }

        /// Adds what was being done to an error, as anyhow's `Context` does.
        // Both methods, as anyhow has them, whether or not a layer uses both.
        #[allow(dead_code)]
        pub trait Context<T> {
            fn context<C: std::fmt::Display>(self, context: C) -> std::result::Result<T, $error>;
            fn with_context<C: std::fmt::Display, F: FnOnce() -> C>(
                self,
                context: F,
            ) -> std::result::Result<T, $error>;
        }

        impl<T, E: Into<$error>> Context<T> for std::result::Result<T, E> {
            fn context<C: std::fmt::Display>(self, context: C) -> std::result::Result<T, $error> {
                self.map_err(|error| error.into().context(context))
            }

            fn with_context<C: std::fmt::Display, F: FnOnce() -> C>(
                self,
                context: F,
            ) -> std::result::Result<T, $error> {
                self.map_err(|error| error.into().context(context()))
            }
        }

        impl<T> Context<T> for Option<T> {
            fn context<C: std::fmt::Display>(self, context: C) -> std::result::Result<T, $error> {
                self.ok_or_else(|| $missing(context.to_string()))
            }

            fn with_context<C: std::fmt::Display, F: FnOnce() -> C>(
                self,
                context: F,
            ) -> std::result::Result<T, $error> {
                self.ok_or_else(|| $missing(context().to_string()))
            }
        }
    };
}

pub(crate) use define_context;
