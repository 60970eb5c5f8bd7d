/* placeholder until the runtime lands */
#include "lmw.h"
int lmw_close_code_index(int code) { return -1; }
lmw_server * lmw_server_new(const lmw_config *cfg, lmw_stats *stats) { return NULL; }
void lmw_server_free(lmw_server *s) { return; }
int lmw_listen_add(lmw_server *s, int fd) { return -1; }
void lmw_listen_stop(lmw_server *s) { return; }
int lmw_poll(lmw_server *s, int timeout_ms, lmw_event *out, int max) { return -1; }
int lmw_wake(lmw_server *s) { return -1; }
int lmw_upgrade_accept(lmw_server *s, int fd, uint32_t gen, const uint8_t *protocol,
                       size_t protocol_len, uint64_t user_tag) { return -1; }
int lmw_reject(lmw_server *s, int fd, uint32_t gen, int status) { return -1; }
int lmw_respond(lmw_server *s, int fd, uint32_t gen, const uint8_t *data, size_t len) { return -1; }
int lmw_send(lmw_server *s, int fd, uint32_t gen, int opcode, const uint8_t *data, size_t len) { return -1; }
int lmw_close(lmw_server *s, int fd, uint32_t gen, int code, const uint8_t *reason,
              size_t reason_len) { return -1; }
int lmw_close_all(lmw_server *s, int code) { return -1; }
int lmw_pause_reading(lmw_server *s, int fd, uint32_t gen) { return -1; }
int lmw_resume_reading(lmw_server *s, int fd, uint32_t gen) { return -1; }
int lmw_is_open(lmw_server *s, int fd, uint32_t gen) { return -1; }
uint64_t lmw_user_tag(lmw_server *s, int fd, uint32_t gen) { return -1; }
int lmw_set_user_tag(lmw_server *s, int fd, uint32_t gen, uint64_t user_tag) { return -1; }
uint32_t lmw_connection_count(lmw_server *s) { return -1; }
lmw_stats * lmw_server_stats(lmw_server *s) { return NULL; }
