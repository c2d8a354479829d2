// Native test harness for wokwi/chips/bme280.chip.c: fakes the Wokwi runtime, drives the I2C callbacks
// like a bus master and prints JSON results (checked by tests/firmware/test_wokwi_files.py).
#include <stdio.h>
#include <string.h>
#include "wokwi-api.h"

void chip_init(void);
double bme_comp_t(double adc_t, double *t_fine);
double bme_comp_p(double adc_p, double t_fine);
double bme_comp_h(double adc_h, double t_fine);

static uint64_t now_ns;
static i2c_config_t bus;
static struct { const char *name; float v; } attrs[8];
static int n_attrs;

uint64_t get_sim_nanos(void) { return now_ns; }
pin_t pin_init(const char *name, uint32_t mode) { return 0; }
i2c_dev_t i2c_init(const i2c_config_t *config) { bus = *config; return 1; }
uint32_t attr_init_float(const char *name, float v) { attrs[n_attrs].name = name; attrs[n_attrs].v = v; return n_attrs++; }
uint32_t attr_init(const char *name, uint32_t v) { return attr_init_float(name, (float)v); }
float attr_read_float(uint32_t id) { return attrs[id].v; }
uint32_t attr_read(uint32_t id) { return (uint32_t)attrs[id].v; }
static void set_attr(const char *name, float v) {
  for (int i = 0; i < n_attrs; i++) if (!strcmp(attrs[i].name, name)) attrs[i].v = v;
}

static void wr(uint8_t reg, uint8_t val) {
  bus.connect(bus.user_data, bus.address, false);
  bus.write(bus.user_data, reg);
  bus.write(bus.user_data, val);
  bus.disconnect(bus.user_data);
}
static void rd(uint8_t reg, uint8_t *buf, int n) {
  bus.connect(bus.user_data, bus.address, false);
  bus.write(bus.user_data, reg);
  bus.connect(bus.user_data, bus.address, true);
  for (int i = 0; i < n; i++) buf[i] = bus.read(bus.user_data);
  bus.disconnect(bus.user_data);
}

static void measure_and_print(const char *label) {
  uint8_t st, d[8];
  wr(0xF2, 0x01);
  wr(0xF4, 0x25);  // T x1, P x1, forced
  rd(0xF3, &st, 1);
  int busy = st & 0x08;
  now_ns += 20000000;
  rd(0xF3, &st, 1);
  rd(0xF7, d, 8);
  uint32_t ap = d[0] << 12 | d[1] << 4 | d[2] >> 4, at = d[3] << 12 | d[4] << 4 | d[5] >> 4, ah = d[6] << 8 | d[7];
  double tf, t = bme_comp_t(at, &tf);
  uint8_t ctrl;
  rd(0xF4, &ctrl, 1);
  printf("\"%s\": {\"busy\": %d, \"done\": %d, \"mode_after\": %d, \"raw\": [%u, %u, %u], \"t\": %.4f, \"p\": %.4f, \"h\": %.4f}",
         label, busy ? 1 : 0, (st & 0x08) ? 0 : 1, ctrl & 3, at, ap, ah, t, bme_comp_p(ap, tf), bme_comp_h(ah, tf));
}

int main(void) {
  chip_init();
  uint8_t id, cal[26], st;
  printf("{\"address\": %u, ", bus.address);
  rd(0xD0, &id, 1);
  printf("\"chip_id\": %u, ", id);
  wr(0xE0, 0xB6);
  rd(0xF3, &st, 1);
  printf("\"im_update_after_reset\": %d, ", st & 1);
  now_ns += 5000000;
  rd(0xF3, &st, 1);
  printf("\"im_update_later\": %d, ", st & 1);
  rd(0x88, cal, 26);
  printf("\"calib\": [");
  for (int i = 0; i < 26; i++) printf("%s%u", i ? ", " : "", cal[i]);
  printf("], ");
  measure_and_print("default");
  printf(", ");
  set_attr("temperature", 30.0f);
  set_attr("humidity", 80.0f);
  set_attr("pressure", 950.0f);
  measure_and_print("changed");
  printf("}\n");
  return 0;
}
