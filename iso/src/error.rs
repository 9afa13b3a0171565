//! Errors of the image build. Each names the step and the object it failed on.

use std::path::PathBuf;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum BuildError {
    #[error(transparent)]
    Tool(#[from] kiln_exec::ToolError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the base rootfs has {0}")]
    Rootfs(String),
    #[error("{0} exists and is not the output of an earlier kiln build; choose another --out")]
    OutNotEmpty(PathBuf),
    #[error(transparent)]
    Modules(#[from] kiln_spec::kmod::ModulesDepError),
}

impl BuildError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BuildError {
        let what = what.into();
        move |source| BuildError::Io { what, source }
    }
}

pub type Result<T, E = BuildError> = std::result::Result<T, E>;
