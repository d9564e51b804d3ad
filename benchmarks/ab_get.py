"""A/B of the 4 KiB GET path between two source trees, same run (wrk -c16 on a presigned URL).

Usage: git worktree add /tmp/ab-before <rev> && (cd /tmp/ab-before && python setup.py build_ext --inplace)
       AB_BEFORE_SRC=/tmp/ab-before/src python benchmarks/ab_get.py
"""
import os, subprocess, sys, time, socket, tempfile, shutil, re, statistics
import boto3
from botocore.config import Config
AK, SK = "AKIAABTEST0000000001", "ab-test-secret-0000000000000000000000000"
def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p
def start(src):
    d = tempfile.mkdtemp(prefix="ab-"); port = free_port()
    env = dict(os.environ, PYTHONPATH=src, AIRLOCK_ACCESS_KEY=AK, AIRLOCK_SECRET_KEY=SK)
    p = subprocess.Popen([sys.executable, "-m", "airlock", "gateway", "--data", d + "/p", "--listen", f"127.0.0.1:{port}"],
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try: socket.create_connection(("127.0.0.1", port), 0.2).close(); break
        except OSError: time.sleep(0.05)
    return p, port, d
def client(port):
    return boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", aws_access_key_id=AK, aws_secret_access_key=SK,
                        region_name="us-east-1", config=Config(s3={"addressing_style": "path"}, signature_version="s3v4",
                        max_pool_connections=32))
def get_rate(port):
    c = client(port)
    c.create_bucket(Bucket="abtest"); c.put_object(Bucket="abtest", Key="k", Body=os.urandom(4096))
    url = c.generate_presigned_url("get_object", Params={"Bucket": "ab", "Key": "k"}, ExpiresIn=3600)
    out = subprocess.run(["wrk", "-t2", "-c16", "-d8s", url], capture_output=True, text=True).stdout
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
results = {"before": [], "after": []}
srcs = {"before": os.environ.get("AB_BEFORE_SRC", "/tmp/ab-before/src"), "after": os.environ.get("AB_AFTER_SRC", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))}
for rnd in range(3):
    for name in (["before", "after"] if rnd % 2 == 0 else ["after", "before"]):
        p, port, d = start(srcs[name])
        try:
            results[name].append(get_rate(port))
        finally:
            p.terminate(); p.wait(); shutil.rmtree(d, ignore_errors=True)
for k, v in results.items():
    print(k, "GET 4KiB c=16 ops/s median", statistics.median(v), "runs", v)
print("ratio after/before", statistics.median(results["after"]) / statistics.median(results["before"]))
