/* placeholder until the hub lands */
#include "lmw.h"
int lmw_subscribe(lmw_server *s, int fd, uint32_t gen, uint32_t topic) { return -1; }
int lmw_unsubscribe(lmw_server *s, int fd, uint32_t gen, uint32_t topic) { return -1; }
uint32_t lmw_topic_size(lmw_server *s, uint32_t topic) { return -1; }
int64_t lmw_publish(lmw_server *s, uint32_t topic, int opcode, const uint8_t *data,
                    size_t len, int policy) { return -1; }
int64_t lmw_send_user(lmw_server *s, uint64_t user_tag, int opcode, const uint8_t *data,
                      size_t len, int policy) { return -1; }
int64_t lmw_broadcast(lmw_server *s, int opcode, const uint8_t *data, size_t len, int policy) { return -1; }
