"""Django settings, read from environment variables through the typed helpers in webapp/env.py.

Development is the default (DEBUG on, SQLite under var/). `KD_ENV=production` turns DEBUG off,
requires SECRET_KEY and switches on secure cookies, HSTS and the HTTPS redirect, so that
`manage.py check --deploy` is clean. Every bad value stops start-up with a message naming it.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import dj_database_url

from webapp.env import EnvError, env_bool, env_int, env_list, env_str

BASE_DIR = Path(__file__).resolve().parent.parent

KD_ENV = env_str("KD_ENV", "development", choices=("development", "production"))
PRODUCTION = KD_ENV == "production"
DEBUG = env_bool("DEBUG", not PRODUCTION)

# Where the app keeps its state by default: the SQLite file, uploads, collected static files.
STATE_DIR = Path(env_str("KD_STATE_DIR", str(BASE_DIR / "var"))).resolve()

if PRODUCTION:
    SECRET_KEY = env_str("SECRET_KEY", required=True)
    if len(SECRET_KEY) < 50:
        raise EnvError("environment variable SECRET_KEY must be at least 50 characters in production")
else:
    SECRET_KEY = env_str("SECRET_KEY", "django-insecure-dev-only-key-never-use-in-production-0123456789")

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", [] if PRODUCTION else ["127.0.0.1", "localhost", "[::1]"])
if PRODUCTION and not ALLOWED_HOSTS:
    raise EnvError("environment variable ALLOWED_HOSTS is required in production (e.g. kd.example.com)")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "channels",
    "axes",  # login throttling (settings below)
    "webapp.studio",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # Static files are served by the ASGI process itself; no separate web server is needed.
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Last, as django-axes asks: it turns a locked-out login into its 429 page.
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "webapp.urls"
WSGI_APPLICATION = "webapp.wsgi.application"
ASGI_APPLICATION = "webapp.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]

# --- database -------------------------------------------------------------------------------
_default_db = f"sqlite:///{STATE_DIR / 'db.sqlite3'}"
_database_url = env_str("DATABASE_URL", _default_db)
try:
    _db = dj_database_url.parse(_database_url, conn_max_age=env_int("DB_CONN_MAX_AGE", 0, minimum=0))
except Exception as exc:  # the parser raises several types; all mean the same to a user
    raise EnvError(f"environment variable DATABASE_URL is not a valid database URL: {exc}") from None
if not _db.get("ENGINE"):
    raise EnvError(f"environment variable DATABASE_URL has an unsupported scheme: {_database_url!r}")
if _db["ENGINE"] == "django.db.backends.sqlite3":
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    # The web process and the worker write to one file: wait for locks rather than fail at once,
    # take the write lock when a transaction starts (no upgrade deadlocks), and let readers run
    # beside the writer (WAL).
    _db["OPTIONS"] = {
        "timeout": 30,
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
    # A test database in a file (not in memory) so that worker processes started by the tests can
    # open it too; one per test process so that concurrent test runs do not collide.
    _db["TEST"] = {
        "NAME": env_str("KD_TEST_DATABASE_NAME", str(STATE_DIR / f"test-db-{os.getpid()}.sqlite3"))
    }
else:
    _db["CONN_HEALTH_CHECKS"] = True
DATABASES = {"default": _db}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Redis, channel layer, Celery -----------------------------------------------------------
REDIS_URL = env_str("REDIS_URL", "redis://127.0.0.1:6379/0")
if not REDIS_URL.startswith(("redis://", "rediss://", "unix://")):
    raise EnvError(f"environment variable REDIS_URL must be a redis:// URL; got {REDIS_URL!r}")

# The metrics sink (workers/sink.py) writes and announces its buffer this often: live latency vs rows per insert.
KD_SINK_FLUSH_MS = env_int("KD_SINK_FLUSH_MS", 150, minimum=20, maximum=10_000)
# Unsent metric values one live socket may hold before it is closed as too slow (webapp/studio/consumers.py).
KD_WS_MAX_BACKLOG_VALUES = env_int("KD_WS_MAX_BACKLOG_VALUES", 50_000, minimum=100)
# ... or whose send has waited this many seconds on a full buffer while more messages arrive.
KD_WS_SEND_STALL_S = env_int("KD_WS_SEND_STALL_S", 10, minimum=1)

# "memory" serves a single process only (a quick demo without Redis); workers need "redis" or "pubsub".
# "pubsub" publishes a group message once per web process, which fans it out to its sockets itself; "redis"
# copies it into every member channel (one Redis round trip per socket). bench/bench_fleet.py compares them.
_channel_layer = env_str("KD_CHANNEL_LAYER", "pubsub", choices=("redis", "pubsub", "memory"))
if _channel_layer == "pubsub":
    CHANNEL_LAYERS = {
        "default": {
            # channels_redis's pub/sub layer, decoding a group message once per process (not per socket) and
            # rebuilding a lost Redis connection (a restart), which it tells the sockets: webapp/channel_layer.py.
            "BACKEND": "webapp.channel_layer.FanOutPubSubLayer",
            "CONFIG": {"hosts": [{"address": REDIS_URL, "socket_timeout": None}]},
        }
    }
elif _channel_layer == "redis":
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            # redis-py >= 8 times out socket reads after 5 s, exactly channels_redis's blocking
            # receive: a quiet socket (a queued job) would then close with 1011. No read timeout.
            "CONFIG": {
                "hosts": [{"address": REDIS_URL, "socket_timeout": None}],
                "capacity": 1000,
                "expiry": 30,
            },
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

# Queues, routes and acknowledgement policy live in webapp/celery.py; here only what varies.
CELERY_BROKER_URL = env_str("CELERY_BROKER_URL", REDIS_URL)
# With late acks, Redis hands an unacknowledged job to another worker after this long: it must
# exceed the longest training run.
CELERY_BROKER_TRANSPORT_OPTIONS = {
    "visibility_timeout": env_int("CELERY_VISIBILITY_TIMEOUT", 24 * 3600, minimum=60)
}
# Only a worker imports the tasks (`celery -A webapp.celery worker`); the web process enqueues by name.
CELERY_IMPORTS = ["workers.tasks"]

# --- job lifecycle (Experiment.claim/finish, workers/jobs.py) ---
# A job whose worker died this many times (each delivery that claimed it and never finished) fails.
KD_MAX_ATTEMPTS = env_int("KD_MAX_ATTEMPTS", 3, minimum=1)
# The running trainer's lease on its row: renewed every third of this; a second delivery of the job
# waits up to about this long for a silent lease to expire (its holder died) before taking over.
KD_LEASE_SECONDS = env_int("KD_LEASE_SECONDS", 60, minimum=3)
# The site's ceiling on any job's running time (config `time_limit_s` may only lower it).
KD_MAX_JOB_SECONDS = env_int("KD_MAX_JOB_SECONDS", 86400, minimum=1)

# --- auth, sessions, security ---------------------------------------------------------------
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]
LOGIN_URL = "/login/"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/login/"

# --- login throttling (django-axes: the login page and the admin's) ---
# After KD_LOGIN_FAILURE_LIMIT wrong passwords for one username from one address, that pair is refused,
# even with the right password (429 and a page saying so), until KD_LOGIN_COOLOFF_S passes without a try.
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",  # first: refuses a locked-out pair before any password check
    "django.contrib.auth.backends.ModelBackend",
]
AXES_FAILURE_LIMIT = env_int("KD_LOGIN_FAILURE_LIMIT", 5, minimum=1)
AXES_COOLOFF_TIME = timedelta(seconds=env_int("KD_LOGIN_COOLOFF_S", 900, minimum=1))
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
AXES_LOCKOUT_TEMPLATE = "locked_out.html"
AXES_DISABLE_ACCESS_LOG = True  # failures are kept (AccessAttempt); a row per successful login is not needed

if PRODUCTION:
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", True)
    SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 31_536_000, minimum=0)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", True)
    SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", True)
    if env_bool("SECURE_PROXY_SSL_HEADER", False):
        # Behind a TLS-terminating proxy that sets X-Forwarded-Proto.
        SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SESSION_COOKIE_HTTPONLY = True
X_FRAME_OPTIONS = "DENY"

# --- files: uploads, media, static ----------------------------------------------------------
MEDIA_ROOT = Path(env_str("MEDIA_ROOT", str(STATE_DIR / "media"))).resolve()
MEDIA_URL = "/media/"  # never served directly: downloads go through views that check the owner
STATIC_URL = "/static/"
STATIC_ROOT = STATE_DIR / "static"
if not PRODUCTION:
    # WhiteNoise warns about a missing STATIC_ROOT on every start until `collectstatic` has run.
    try:
        STATIC_ROOT.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass
STATICFILES_DIRS = [
    entry
    for entry in (BASE_DIR / "webapp" / "static", ("uplot", BASE_DIR / "node_modules" / "uplot" / "dist"))
    if Path(entry[1] if isinstance(entry, tuple) else entry).is_dir()
]
# Uploads go to the default storage (a local folder). For object storage install django-storages
# and set KD_STORAGE_BACKEND=storages.backends.s3.S3Storage plus its AWS_* variables.
_storage_backend = env_str("KD_STORAGE_BACKEND", "django.core.files.storage.FileSystemStorage")
_storage_options = {}
if _storage_backend == "storages.backends.s3.S3Storage":
    # Optional (not installed by default): `pip install django-storages[s3]`. Credentials come from
    # the usual AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY variables, read by boto3 itself.
    _storage_options = {
        "bucket_name": env_str("AWS_STORAGE_BUCKET_NAME", required=True),
        "endpoint_url": env_str("AWS_S3_ENDPOINT_URL") or None,
        "region_name": env_str("AWS_S3_REGION_NAME") or None,
        "default_acl": None,
        "querystring_auth": True,
        "file_overwrite": False,
    }
STORAGES = {
    "default": {"BACKEND": _storage_backend, "OPTIONS": _storage_options},
    "staticfiles": {
        "BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"
        if PRODUCTION
        else "django.contrib.staticfiles.storage.StaticFilesStorage"
    },
}
# Anything larger than this goes to a temporary file while it arrives, never whole into memory.
FILE_UPLOAD_MAX_MEMORY_SIZE = 256 * 1024
KD_MAX_UPLOAD_BYTES = env_int("KD_MAX_UPLOAD_MB", 1024, minimum=1) * 1024 * 1024
# --- request bodies (webapp/body_guard.py, in front of Django) ---
# Every body but a file upload to /api/datasets/ or /api/checkpoints/ (JSON configs, forms); the server
# refuses a larger one with 413 before reading it. Django's own check on non-file fields agrees.
KD_MAX_BODY_BYTES = env_int("KD_MAX_BODY_KB", 1024, minimum=1) * 1024
DATA_UPLOAD_MAX_MEMORY_SIZE = KD_MAX_BODY_BYTES
FILE_UPLOAD_HANDLERS = [
    "webapp.studio.storage.MaxSizeUploadHandler",
    "django.core.files.uploadhandler.MemoryFileUploadHandler",
    "django.core.files.uploadhandler.TemporaryFileUploadHandler",
]

# /healthz answers 503 unless at least this many Celery workers answer a ping.
KD_HEALTHZ_MIN_WORKERS = env_int("KD_HEALTHZ_MIN_WORKERS", 1, minimum=0)
# /healthz reuses its answer this long: its Celery ping waits 0.5 s, and it answers anyone (0: every call probes).
KD_HEALTHZ_CACHE_S = env_int("KD_HEALTHZ_CACHE_S", 2, minimum=0)

# --- per-user limits (what one account can make the site hold) ------------------------------
# Queued + running experiments per user; more is refused with 429 until some finish.
KD_MAX_ACTIVE_JOBS = env_int("KD_MAX_ACTIVE_JOBS", 100, minimum=1)
# Experiments one sweep may create.
KD_MAX_SWEEP_SIZE = env_int("KD_MAX_SWEEP_SIZE", 64, minimum=1, maximum=10_000)
# Bytes of datasets, checkpoints and experiment files per user; an upload past it is refused (413).
# 0 turns the quota off.
KD_STORAGE_QUOTA_BYTES = env_int("KD_STORAGE_QUOTA_BYTES", 50 * 1024**3, minimum=0)
# --- datasets: the store, ingestion, import without upload -------------------------------------
# Uploads up to this size are ingested into their store in the request (201, ready); larger ones and every
# import are ingested by a worker on the default queue (202, "ingesting" with progress). Unset: the lower
# of 16 MiB and KD_SYNC_INSPECT_MAX_BYTES (webapp/studio/services.py).
KD_SYNC_INGEST_MAX_BYTES = env_int("KD_SYNC_INGEST_MAX_BYTES", -1, minimum=-1)
# A folder on the server (readable by the web app and the workers) whose files and folders users may import
# in place with {"import_path": ...}; empty turns importing off.
KD_IMPORT_ROOT = env_str("KD_IMPORT_ROOT", "")
# An ingesting dataset whose worker gave no sign of life for this long is restarted (or failed after
# KD_MAX_ATTEMPTS tries) by workers.cleanup.
KD_INGEST_STALE_S = env_int("KD_INGEST_STALE_S", 300, minimum=30)
# Points per metric series of one experiment: a smaller log_every is raised to stay under it, and
# (validation logging once an epoch) more epochs are refused. The default is the config's epoch cap.
KD_MAX_POINTS_PER_SERIES = env_int("KD_MAX_POINTS_PER_SERIES", 100_000, minimum=100)

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {
        "handlers": ["console"],
        "level": env_str("LOG_LEVEL", "INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR")),
    },
}
