//! How a job fails: one [`FailureReason`] word per cause (the job's `status.reason`), a message
//! for people, and whether another attempt may succeed. Every stage's own error maps here, and
//! only here.

use super::fetch::DecodeError;
use super::inpaint::InpaintError;
use super::mask::MaskError;
use super::store::StoreError;
use crate::storage::StorageError;

/// Why a job failed: a one-word CamelCase reason, as the job's status shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FailureReason {
    /// Photo bytes are not a PNG/JPEG/WebP image, or are corrupt or truncated.
    InvalidImage,
    /// Mask bytes are not an image, or are corrupt or truncated.
    InvalidMask,
    /// Photo (or mask) over the pixel limit.
    ImageTooLarge,
    /// Photo below the minimum size.
    ImageTooSmall,
    /// Mask size differs from the photo's beyond the mask size policy.
    MaskSizeMismatch,
    /// Nothing to fill: no white pixel, or only specks.
    EmptyMask,
    /// The mask covers (almost) the whole photo.
    MaskCoversImage,
    /// An input does not exist (404, no such file).
    InputNotFound,
    /// An input's location could not be reached (connection, timeout, 5xx). Retryable.
    InputUnreachable,
    /// An input is larger than the byte limit.
    InputTooLarge,
    /// A URI can't be parsed.
    InvalidUri,
    /// A URI's scheme is not one of file, s3, gs, az, http(s), or is plain http where only
    /// https is allowed.
    UnsupportedScheme,
    /// An `http(s)://` input (or a redirect hop) names an address the worker may not reach:
    /// loopback, link-local (cloud metadata), private, or a configured cluster range.
    AddressNotAllowed,
    /// A `file://` URI outside the worker's allowed roots.
    OutsideAllowedRoots,
    /// An `s3://`, `gs://` or `az://` URI outside the pool's allowed prefixes (or none set).
    OutsideAllowedPrefixes,
    /// The output names the job's photo or mask.
    OutputIsInput,
    /// Create-only storage and the output exists already.
    OutputExists,
    /// The storage refused the credentials.
    AccessDenied,
    /// The output location can't be written (or is read-only, like http).
    OutputNotWritable,
    /// The output URI's extension names no supported format.
    UnsupportedOutputFormat,
    /// A storage backend failed in a way that may pass. Retryable.
    StorageError,
    /// The model failed.
    ModelError,
    /// The device ran out of memory. Retryable (memory is freed; another attempt or worker
    /// may have room).
    OutOfMemory,
    /// The job was cancelled while running.
    Cancelled,
}

impl FailureReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::InvalidImage => "InvalidImage",
            FailureReason::InvalidMask => "InvalidMask",
            FailureReason::ImageTooLarge => "ImageTooLarge",
            FailureReason::ImageTooSmall => "ImageTooSmall",
            FailureReason::MaskSizeMismatch => "MaskSizeMismatch",
            FailureReason::EmptyMask => "EmptyMask",
            FailureReason::MaskCoversImage => "MaskCoversImage",
            FailureReason::InputNotFound => "InputNotFound",
            FailureReason::InputUnreachable => "InputUnreachable",
            FailureReason::InputTooLarge => "InputTooLarge",
            FailureReason::InvalidUri => "InvalidUri",
            FailureReason::UnsupportedScheme => "UnsupportedScheme",
            FailureReason::OutsideAllowedRoots => "OutsideAllowedRoots",
            FailureReason::OutsideAllowedPrefixes => "OutsideAllowedPrefixes",
            FailureReason::OutputIsInput => "OutputIsInput",
            FailureReason::OutputExists => "OutputExists",
            FailureReason::AddressNotAllowed => "AddressNotAllowed",
            FailureReason::AccessDenied => "AccessDenied",
            FailureReason::OutputNotWritable => "OutputNotWritable",
            FailureReason::UnsupportedOutputFormat => "UnsupportedOutputFormat",
            FailureReason::StorageError => "StorageError",
            FailureReason::ModelError => "ModelError",
            FailureReason::OutOfMemory => "OutOfMemory",
            FailureReason::Cancelled => "Cancelled",
        }
    }
}

impl std::fmt::Display for FailureReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed job: its reason, a message for people, and whether another attempt may succeed.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{reason}: {message}")]
pub struct PipelineError {
    pub reason: FailureReason,
    pub message: String,
    pub retryable: bool,
}

impl PipelineError {
    pub fn new(reason: FailureReason, message: impl Into<String>) -> Self {
        PipelineError {
            reason,
            message: message.into(),
            retryable: matches!(
                reason,
                FailureReason::InputUnreachable
                    | FailureReason::StorageError
                    | FailureReason::OutOfMemory
            ),
        }
    }

    pub(crate) fn cancelled() -> Self {
        PipelineError::new(FailureReason::Cancelled, "cancelled")
    }

    /// A storage error while reading `what` ("photo", "mask") or writing the output.
    pub fn storage(err: StorageError, what: &str, writing: bool) -> Self {
        let retryable = err.is_transient();
        let reason = match &err {
            StorageError::InvalidUri { .. } => FailureReason::InvalidUri,
            StorageError::UnsupportedScheme { .. } | StorageError::SchemeNotAllowed { .. } => {
                FailureReason::UnsupportedScheme
            }
            StorageError::AddressNotAllowed { .. } => FailureReason::AddressNotAllowed,
            StorageError::OutsideRoots { .. } => FailureReason::OutsideAllowedRoots,
            StorageError::OutsidePrefixes { .. } => FailureReason::OutsideAllowedPrefixes,
            StorageError::OverwritesInput { .. } => FailureReason::OutputIsInput,
            StorageError::Exists { .. } => FailureReason::OutputExists,
            StorageError::AccessDenied { .. } if writing => FailureReason::OutputNotWritable,
            StorageError::AccessDenied { .. } => FailureReason::AccessDenied,
            StorageError::ReadOnly { .. } | StorageError::NotWritable { .. } => {
                FailureReason::OutputNotWritable
            }
            StorageError::NotFound { .. } => FailureReason::InputNotFound,
            StorageError::TooLarge { .. } => FailureReason::InputTooLarge,
            StorageError::Unreachable { .. } | StorageError::HttpStatus { .. } if !writing => {
                FailureReason::InputUnreachable
            }
            _ => FailureReason::StorageError,
        };
        PipelineError {
            reason,
            message: format!("{what}: {err}"),
            retryable,
        }
    }

    pub(crate) fn decode(err: DecodeError, what: &str, is_mask: bool) -> Self {
        let reason = match (&err, is_mask) {
            (DecodeError::TooLarge { .. }, _) => FailureReason::ImageTooLarge,
            (DecodeError::TooSmall { .. }, false) => FailureReason::ImageTooSmall,
            (DecodeError::MaskSize { .. }, _) => FailureReason::MaskSizeMismatch,
            (_, true) => FailureReason::InvalidMask,
            (_, false) => FailureReason::InvalidImage,
        };
        PipelineError::new(reason, format!("{what}: {err}"))
    }

    pub(crate) fn model(err: InpaintError) -> Self {
        match err {
            InpaintError::Cancelled => PipelineError::cancelled(),
            InpaintError::OutOfMemory(m) => {
                PipelineError::new(FailureReason::OutOfMemory, format!("out of memory: {m}"))
            }
            e => PipelineError::new(FailureReason::ModelError, e.to_string()),
        }
    }
}

impl From<MaskError> for PipelineError {
    fn from(e: MaskError) -> Self {
        let reason = match e {
            MaskError::Empty { .. } | MaskError::OnlySpecks { .. } => FailureReason::EmptyMask,
            MaskError::CoversImage { .. } => FailureReason::MaskCoversImage,
        };
        PipelineError::new(reason, format!("mask: {e}"))
    }
}

impl From<StoreError> for PipelineError {
    fn from(e: StoreError) -> Self {
        let reason = match e {
            StoreError::UnsupportedFormat(_) => FailureReason::UnsupportedOutputFormat,
            StoreError::Encode(_) => FailureReason::StorageError,
        };
        PipelineError::new(reason, e.to_string())
    }
}
