# Source this: nginx_hash_conf DIR LISTEN_PORT NODE_PORT... writes DIR/nginx.conf,
# the peer kv-proxy is compared with: nginx proxying to the kv-nodes by
# `hash $request_uri consistent`, with upstream keep-alive (64) over HTTP/1.1.
# One definition, so every script measures the same nginx.
nginx_hash_conf() {
  local dir=$1 listen=$2
  shift 2
  local servers="" port
  for port in "$@"; do servers+="        server 127.0.0.1:$port;"$'\n'; done
  mkdir -p "$dir"
  cat >"$dir/nginx.conf" <<CONF
worker_processes auto;
daemon off;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $dir/body;
    proxy_temp_path $dir/proxy;
    fastcgi_temp_path $dir/fastcgi;
    uwsgi_temp_path $dir/uwsgi;
    scgi_temp_path $dir/scgi;
    upstream kv {
        hash \$request_uri consistent;
$servers        keepalive 64;
    }
    server {
        listen 127.0.0.1:$listen;
        location / {
            proxy_pass http://kv;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
CONF
}
