/* curl_defaults.h -- the settings every libcurl easy handle of shardfs gets.
 *
 * curl_defaults(h): no signals (we are threaded), TCP keep-alive and no
 * Nagle delay (small requests), redirects never followed by curl itself
 * (callers follow a 307 only after checking and re-signing it), and only
 * http and https. Used by shard_remote.c and etcd.c; safe to call again
 * after curl_easy_reset().
 */
#ifndef SHARDFS_CURL_DEFAULTS_H
#define SHARDFS_CURL_DEFAULTS_H

#include <curl/curl.h>

static inline void curl_defaults(CURL *h)
{
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(h, CURLOPT_TCP_KEEPALIVE, 1L);
    curl_easy_setopt(h, CURLOPT_TCP_NODELAY, 1L);
    curl_easy_setopt(h, CURLOPT_FOLLOWLOCATION, 0L);
#if LIBCURL_VERSION_NUM >= 0x075500 /* 7.85: CURLOPT_PROTOCOLS deprecated */
    curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "http,https");
#else
    curl_easy_setopt(h, CURLOPT_PROTOCOLS, (long)(CURLPROTO_HTTP | CURLPROTO_HTTPS));
#endif
}

#endif
